using System.Collections.Immutable;
using System.Linq;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.Diagnostics;
using Microsoft.CodeAnalysis.Operations;

namespace ModelCompression.Analyzers;

/// <summary>
/// Finds TorchSharp Scalars that nothing keeps alive while LibTorch reads them.
/// </summary>
/// <remarks>
/// A TorchSharp <c>Scalar</c> owns a native object and frees it in its finalizer. TorchSharp 0.107's methods read the
/// handle and call LibTorch without keeping the Scalar alive, so once the JIT has optimised the caller, a temporary
/// Scalar (a number converted implicitly, or one TorchSharp makes itself, such as the alpha of 1 that <c>add</c> and
/// the <c>+</c> operator pass) can be finalized by a collection on another thread during the call: LibTorch then
/// reads freed memory (an "Unknown scalar type" error, a crash, or a wrong number). A Scalar is safe when a
/// <c>using</c> declaration or a field holds it until the call returns; the library's <c>KeptScalars</c> helpers do that.
/// </remarks>
[DiagnosticAnalyzer(LanguageNames.CSharp)]
public sealed class TemporaryScalarAnalyzer : DiagnosticAnalyzer
{
    /// <summary>The diagnostic's identifier.</summary>
    public const string DiagnosticId = "MC0001";

    private static readonly DiagnosticDescriptor Rule = new(
        DiagnosticId,
        "TorchSharp Scalar not kept alive during the native call",
        "{0}: nothing keeps the Scalar alive while LibTorch reads it, so a collection on another thread can free it mid-call; hold it in a using declaration or use KeptScalars",
        "Reliability",
        DiagnosticSeverity.Warning,
        isEnabledByDefault: true,
        description: "TorchSharp frees a Scalar's native object in its finalizer and does not keep the Scalar alive during the calls that read it.");

    // Tensor methods that make a Scalar of their own (an alpha or value of 1) and pass it on.
    private static readonly ImmutableHashSet<string> OneArgumentAdds = ImmutableHashSet.Create("add", "add_");
    private static readonly ImmutableHashSet<string> TwoArgumentAddcs = ImmutableHashSet.Create("addcdiv", "addcdiv_", "addcmul", "addcmul_");

    /// <inheritdoc/>
    public override ImmutableArray<DiagnosticDescriptor> SupportedDiagnostics => ImmutableArray.Create(Rule);

    /// <inheritdoc/>
    public override void Initialize(AnalysisContext context)
    {
        context.ConfigureGeneratedCodeAnalysis(GeneratedCodeAnalysisFlags.None);
        context.EnableConcurrentExecution();
        context.RegisterCompilationStartAction(start =>
        {
            var scalar = start.Compilation.GetTypeByMetadataName("TorchSharp.Scalar");
            var tensor = start.Compilation.GetTypeByMetadataName("TorchSharp.torch+Tensor");
            var tensorExtensions = start.Compilation.GetTypeByMetadataName("TorchSharp.TensorExtensionMethods");
            var torch = start.Compilation.GetTypeByMetadataName("TorchSharp.torch");
            if (scalar is null || tensor is null || torch is null)
            {
                return;
            }

            start.RegisterOperationAction(c => AnalyzeConversion(c, scalar), OperationKind.Conversion);
            start.RegisterOperationAction(c => AnalyzeInvocation(c, scalar, tensor, torch, tensorExtensions), OperationKind.Invocation);
            start.RegisterOperationAction(c => AnalyzeOperator(c, tensor), OperationKind.Binary, OperationKind.CompoundAssignment);
        });
    }

    private static void AnalyzeConversion(OperationAnalysisContext context, INamedTypeSymbol scalar)
    {
        var conversion = (IConversionOperation)context.Operation;
        if (conversion.OperatorMethod is { } method && SymbolEqualityComparer.Default.Equals(method.ContainingType, scalar)
            && SymbolEqualityComparer.Default.Equals(conversion.Type, scalar) && !IsHeld(conversion))
        {
            context.ReportDiagnostic(Diagnostic.Create(Rule, conversion.Syntax.GetLocation(), $"'{conversion.Operand.Syntax}' converted to a Scalar"));
        }
    }

    private static void AnalyzeInvocation(OperationAnalysisContext context, INamedTypeSymbol scalar, INamedTypeSymbol tensor, INamedTypeSymbol torch, INamedTypeSymbol? tensorExtensions)
    {
        var invocation = (IInvocationOperation)context.Operation;
        var method = invocation.TargetMethod;
        string? what = null;
        if (method.Name == "ToScalar" && SymbolEqualityComparer.Default.Equals(method.ReturnType, scalar) && !IsHeld(invocation))
        {
            what = "a Scalar made by ToScalar()";
        }
        else if (SymbolEqualityComparer.Default.Equals(method.ContainingType, tensor)
            && ((OneArgumentAdds.Contains(method.Name) && method.Parameters.Length == 1)
                || (TwoArgumentAddcs.Contains(method.Name) && method.Parameters.Length == 2)
                || method.Name is "elu" or "elu_"))
        {
            what = $"Tensor.{method.Name} without its scale passes a Scalar of its own";
        }
        else if (SymbolEqualityComparer.Default.Equals(method.ContainingType, torch)
            && ((OneArgumentAdds.Contains(method.Name) && method.Parameters.Length == 2)
                || (method.Name == "arange" && method.Parameters.Count(p => SymbolEqualityComparer.Default.Equals(p.Type, scalar)) < 3)))
        {
            what = $"torch.{method.Name} with fewer arguments passes Scalars of its own";
        }
        else if (tensorExtensions is not null && SymbolEqualityComparer.Default.Equals(method.ContainingType, tensorExtensions)
            && method.Name.StartsWith("To", System.StringComparison.Ordinal) && method.Parameters.Length == 1
            && method.ReturnType.SpecialType != SpecialType.None)
        {
            what = $"Tensor.{method.Name}() reads the value through a temporary Scalar";
        }

        if (what is not null)
        {
            context.ReportDiagnostic(Diagnostic.Create(Rule, invocation.Syntax.GetLocation(), what));
        }
    }

    private static void AnalyzeOperator(OperationAnalysisContext context, INamedTypeSymbol tensor)
    {
        var (method, syntax) = context.Operation switch
        {
            IBinaryOperation binary => (binary.OperatorMethod, binary.Syntax),
            ICompoundAssignmentOperation compound => (compound.OperatorMethod, compound.Syntax),
            _ => (null, context.Operation.Syntax),
        };
        if (method is null || !SymbolEqualityComparer.Default.Equals(method.ContainingType, tensor))
        {
            return;
        }

        // Tensor + anything runs add(…, alpha: 1), and number − Tensor runs negative().add(number, 1): both pass a 1 of
        // TorchSharp's own. An operand that is a number is converted to a Scalar inside TorchSharp.
        bool primitiveOperand = method.Parameters.Any(p => p.Type.SpecialType != SpecialType.None);
        bool hiddenOne = method.Name == "op_Addition"
            || (method.Name == "op_Subtraction" && !SymbolEqualityComparer.Default.Equals(method.Parameters[0].Type, tensor));
        if (primitiveOperand || hiddenOne)
        {
            context.ReportDiagnostic(Diagnostic.Create(Rule, syntax.GetLocation(), $"the Tensor operator '{method.Name}' makes a temporary Scalar"));
        }
    }

    // A Scalar is held when it initialises a using declaration or statement, or is stored in a field or property.
    private static bool IsHeld(IOperation operation)
    {
        var parent = operation.Parent;
        while (parent is IConversionOperation { IsImplicit: true })
        {
            parent = parent.Parent;
        }

        if (parent is ISimpleAssignmentOperation assignment && assignment.Target is IFieldReferenceOperation or IPropertyReferenceOperation)
        {
            return true;
        }

        if (parent is IFieldInitializerOperation or IPropertyInitializerOperation)
        {
            return true;
        }

        if (parent is IVariableInitializerOperation { Parent: IVariableDeclaratorOperation { Parent: IVariableDeclarationOperation declaration } })
        {
            var owner = declaration.Parent is IVariableDeclarationGroupOperation group ? group.Parent : declaration.Parent;
            return owner is IUsingDeclarationOperation or IUsingOperation;
        }

        return false;
    }
}
