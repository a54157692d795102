using System.Reflection;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace ModelCompression.Modules;

/// <summary>
/// Finds and replaces submodules by the dotted names that <c>named_modules()</c> gives them.
/// </summary>
public static class ModuleTree
{
    private static readonly FieldInfo SubmodulesField = typeof(nn.Module).GetField(
        "_internal_submodules", BindingFlags.Instance | BindingFlags.NonPublic | BindingFlags.Public)
        ?? throw new InvalidOperationException("This TorchSharp version has no Module._internal_submodules field.");

    /// <summary>Returns the submodule with the given dotted name.</summary>
    /// <param name="root">The root module.</param>
    /// <param name="name">A dotted name as given by <c>named_modules()</c>, e.g. <c>features.0</c>.</param>
    /// <returns>The submodule.</returns>
    /// <exception cref="ArgumentException">No submodule has that name.</exception>
    public static nn.Module GetSubmodule(nn.Module root, string name)
    {
        ArgumentNullException.ThrowIfNull(root);
        ArgumentException.ThrowIfNullOrEmpty(name);
        var current = root;
        foreach (var part in name.Split('.'))
        {
            var child = current.named_children().FirstOrDefault(c => c.name == part).module;
            current = child ?? throw new ArgumentException($"The model has no submodule named '{name}'.", nameof(name));
        }

        return current;
    }

    /// <summary>Returns whether a module enclosing the named submodule (below the root) is a <typeparamref name="T"/>.</summary>
    /// <typeparam name="T">The ancestor type (e.g. <c>ICompressedLayer</c>).</typeparam>
    /// <param name="root">The root module.</param>
    /// <param name="name">The dotted name.</param>
    /// <param name="includeRoot">Whether the root itself counts as an ancestor of every submodule.</param>
    /// <returns><see langword="true"/> when some enclosing module is a <typeparamref name="T"/>.</returns>
    public static bool HasAncestor<T>(nn.Module root, string name, bool includeRoot = false)
    {
        ArgumentNullException.ThrowIfNull(root);
        ArgumentNullException.ThrowIfNull(name);
        if (includeRoot && root is T && name.Length > 0)
        {
            return true;
        }

        for (int dot = name.LastIndexOf('.'); dot > 0; dot = name.LastIndexOf('.'))
        {
            name = name[..dot];
            if (GetSubmodule(root, name) is T)
            {
                return true;
            }
        }

        return false;
    }

    /// <summary>
    /// Says whether <see cref="Replace"/> could put a module of <paramref name="replacementType"/> in place of the
    /// submodule named <paramref name="name"/>, without changing anything: steps check every layer first, so that they
    /// never stop halfway through a model.
    /// </summary>
    /// <param name="root">The root module.</param>
    /// <param name="name">The dotted name of the submodule.</param>
    /// <param name="replacementType">The type of the module that would replace it.</param>
    /// <returns><see langword="null"/> when it can be replaced, else why not.</returns>
    public static string? WhyCannotReplace(nn.Module root, string name, Type replacementType)
    {
        ArgumentNullException.ThrowIfNull(root);
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(replacementType);
        int dot = name.LastIndexOf('.');
        string parentName = dot < 0 ? string.Empty : name[..dot];
        string childName = dot < 0 ? name : name[(dot + 1)..];
        nn.Module parent;
        try
        {
            parent = parentName.Length == 0 ? root : GetSubmodule(root, parentName);
        }
        catch (ArgumentException ex)
        {
            return ex.Message;
        }

        var old = parent.named_children().FirstOrDefault(c => c.name == childName).module;
        if (old is null)
        {
            return $"The model has no submodule named '{name}'.";
        }

        if (parent is Sequential)
        {
            return parentName.Length == 0 ? null : WhyCannotReplace(root, parentName, typeof(Sequential));
        }

        bool held = false;
        for (var t = parent.GetType(); t is not null && t != typeof(nn.Module); t = t.BaseType)
        {
            foreach (var field in t.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
            {
                if (!ReferenceEquals(field.GetValue(parent), old))
                {
                    continue;
                }

                if (!field.FieldType.IsAssignableFrom(replacementType))
                {
                    return $"the field {t.Name}.{field.Name} that holds '{name}' is typed {field.FieldType.Name}, which a {replacementType.Name} cannot fill";
                }

                held = true;
            }
        }

        if (CollectionElementType(parent) is { } element)
        {
            return element.IsAssignableFrom(replacementType)
                ? null
                : $"its parent {parent.GetType().Name} holds {element.Name} modules, which a {replacementType.Name} is not";
        }

        return held ? null : $"its parent {parent.GetType().Name} keeps '{name}' in no field this library can update";
    }

    /// <summary>The element type of a <see cref="ModuleList{T}"/> or <see cref="ModuleDict{T}"/> parent, or <see langword="null"/>.</summary>
    private static Type? CollectionElementType(nn.Module parent)
    {
        for (var t = parent.GetType(); t is not null; t = t.BaseType)
        {
            if (t.IsGenericType && (t.GetGenericTypeDefinition() == typeof(ModuleList<>) || t.GetGenericTypeDefinition() == typeof(ModuleDict<>)))
            {
                return t.GetGenericArguments()[0];
            }
        }

        return null;
    }

    /// <summary>Puts <paramref name="replacement"/> in a module list's slot or a module dictionary's entry (already checked to fit).</summary>
    private static void SetCollectionItem(nn.Module parent, string childName, nn.Module replacement)
    {
        for (var t = parent.GetType(); t is not null; t = t.BaseType)
        {
            if (!t.IsGenericType)
            {
                continue;
            }

            var definition = t.GetGenericTypeDefinition();
            var element = t.GetGenericArguments()[0];
            if (definition == typeof(ModuleList<>) && int.TryParse(childName, out int index))
            {
                t.GetProperty("Item", element, [typeof(int)])!.SetValue(parent, replacement, [index]);
                return;
            }

            if (definition == typeof(ModuleDict<>))
            {
                t.GetProperty("Item", element, [typeof(string)])!.SetValue(parent, replacement, [childName]);
                return;
            }
        }
    }

    /// <summary>
    /// Replaces the submodule with the given dotted name, updating both the field that the parent's
    /// <c>forward</c> reads and the registry that <c>parameters()</c> and <c>state_dict()</c> read.
    /// </summary>
    /// <param name="root">The root module.</param>
    /// <param name="name">The dotted name of the submodule to replace.</param>
    /// <param name="replacement">The new submodule.</param>
    /// <returns>
    /// The root of the rewritten model: <paramref name="root"/> itself, or a new <see cref="Sequential"/> when the
    /// root is a <see cref="Sequential"/> whose direct child was replaced (a Sequential cannot be changed in place).
    /// </returns>
    /// <remarks>The replaced module is not disposed; the caller decides (it may be reused inside <paramref name="replacement"/>).</remarks>
    /// <exception cref="ArgumentException">No submodule has that name, or the parent's field cannot hold the replacement.</exception>
    public static nn.Module<Tensor, Tensor> Replace(nn.Module<Tensor, Tensor> root, string name, nn.Module<Tensor, Tensor> replacement)
    {
        ArgumentNullException.ThrowIfNull(root);
        ArgumentException.ThrowIfNullOrEmpty(name);
        ArgumentNullException.ThrowIfNull(replacement);

        int dot = name.LastIndexOf('.');
        string parentName = dot < 0 ? string.Empty : name[..dot];
        string childName = dot < 0 ? name : name[(dot + 1)..];
        var parent = parentName.Length == 0 ? root : GetSubmodule(root, parentName);
        if (parent.named_children().All(c => c.name != childName))
        {
            throw new ArgumentException($"The model has no submodule named '{name}'.", nameof(name));
        }

        if (parent is Sequential sequential)
        {
            var rebuilt = nn.Sequential(sequential.named_children()
                .Select(c => (c.name, c.name == childName ? replacement : (nn.Module<Tensor, Tensor>)c.module))
                .ToArray());
            rebuilt.train(sequential.training);
            return parentName.Length == 0 ? rebuilt : Replace(root, parentName, rebuilt);
        }

        SetChild(parent, childName, replacement, name);
        return root;
    }

    /// <summary>
    /// Puts <paramref name="replacement"/> in place of the direct child <paramref name="childName"/> of a parent that is
    /// not a <see cref="Sequential"/>: every field that holds the old child, a module list's slot, and the registry entry.
    /// Any module type may be set where the fields allow it.
    /// </summary>
    internal static void SetChild(nn.Module parent, string childName, nn.Module replacement, string? dottedName = null)
    {
        string name = dottedName ?? childName;
        var old = parent.named_children().FirstOrDefault(c => c.name == childName).module
            ?? throw new ArgumentException($"The model has no submodule named '{name}'.", nameof(childName));

        // Find every field that holds the old child before changing anything.
        var fields = new List<FieldInfo>();
        for (var t = parent.GetType(); t is not null && t != typeof(nn.Module); t = t.BaseType)
        {
            foreach (var field in t.GetFields(BindingFlags.Instance | BindingFlags.Public | BindingFlags.NonPublic | BindingFlags.DeclaredOnly))
            {
                if (!ReferenceEquals(field.GetValue(parent), old))
                {
                    continue;
                }

                if (!field.FieldType.IsInstanceOfType(replacement))
                {
                    throw new ArgumentException(
                        $"Cannot replace '{name}': the field {t.Name}.{field.Name} is typed {field.FieldType.Name}, which a {replacement.GetType().Name} " +
                        "cannot fill. Type fields that may be swapped as nn.Module<Tensor, Tensor>.",
                        nameof(childName));
                }

                fields.Add(field);
            }
        }

        var element = CollectionElementType(parent);
        if (element is not null && !element.IsInstanceOfType(replacement))
        {
            throw new ArgumentException($"Cannot replace '{name}': its parent {parent.GetType().Name} holds {element.Name} modules, which a {replacement.GetType().Name} is not.", nameof(childName));
        }

        if (fields.Count == 0 && element is null)
        {
            throw new ArgumentException(
                $"Cannot replace '{name}': its parent {parent.GetType().Name} keeps it in no field this library can update.", nameof(childName));
        }

        foreach (var field in fields)
        {
            field.SetValue(parent, replacement);
        }

        if (element is not null)
        {
            SetCollectionItem(parent, childName, replacement);
        }

        // Keep the registry entry in place (same order of parameters and state_dict keys).
        var registry = SubmodulesField.GetValue(parent)!;
        registry.GetType().GetProperty("Item", [typeof(string)])!.SetValue(registry, replacement, [childName]);
    }
}
