using System.Text.Json;
using System.Text.RegularExpressions;
using System.Xml.Linq;
using ModelCompression.Tests.Support;
using NUnit.Framework;

namespace ModelCompression.Tests.Interactive;

/// <summary>
/// The notebooks in examples/notebooks as files: CI runs them against freshly packed packages under a throwaway
/// version (.ci/notebooks.sh), so these tests check what that run cannot: that the package versions a user's copy asks
/// for are the ones this repository packs, and that the notebooks are committed clean.
/// </summary>
[TestFixture]
public sealed partial class NotebookFilesTests
{
    private static readonly string[] Notebooks = ["QuickStart.ipynb", "TradeOffs.ipynb"];

    private static JsonElement Read(string name) =>
        JsonDocument.Parse(File.ReadAllText(Path.Combine(RepositoryFiles.Root, "examples", "notebooks", name))).RootElement;

    private static IEnumerable<string> CodeCells(JsonElement notebook) => notebook.GetProperty("cells").EnumerateArray()
        .Where(c => c.GetProperty("cell_type").GetString() == "code")
        .Select(c => string.Concat(c.GetProperty("source").EnumerateArray().Select(l => l.GetString())));

    private static string ProjectVersion(string project)
    {
        string root = RepositoryFiles.Root;
        string? own = XDocument.Load(Path.Combine(root, "src", project, $"{project}.csproj")).Descendants("Version").Select(e => e.Value).FirstOrDefault();
        return own ?? XDocument.Load(Path.Combine(root, "Directory.Build.props")).Descendants("Version").Single().Value;
    }

    private static string CentralVersion(string package) => XDocument.Load(Path.Combine(RepositoryFiles.Root, "Directory.Packages.props"))
        .Descendants("PackageVersion").Single(e => (string?)e.Attribute("Include") == package).Attribute("Version")!.Value;

    [GeneratedRegex("""#r "nuget: ([A-Za-z.\-]+), ([^"]+)"$""", RegexOptions.Multiline)]
    private static partial Regex PackageReference();

    [TestCaseSource(nameof(Notebooks))]
    public void Notebook_ReferencesThePackagesThisRepositoryPacks(string name)
    {
        var notebook = Read(name);
        Assert.That(notebook.GetProperty("nbformat").GetInt32(), Is.EqualTo(4));
        Assert.That(notebook.GetProperty("metadata").GetProperty("kernelspec").GetProperty("name").GetString(), Is.EqualTo(".net-csharp"));

        string first = CodeCells(notebook).First();
        Assert.That(first, Does.Contain("#i \"nuget: ../../artifacts/packages\""), "the local source the README's pack loop fills");
        var references = PackageReference().Matches(first).ToDictionary(m => m.Groups[1].Value, m => m.Groups[2].Value);
        Assert.That(references, Is.EqualTo(new Dictionary<string, string>
        {
            ["ModelCompression.Samples"] = ProjectVersion("ModelCompression.Samples"),
            ["ModelCompression.Interactive"] = ProjectVersion("ModelCompression.Interactive"),
            ["TorchSharp-cpu"] = CentralVersion("TorchSharp-cpu"),
        }));
    }

    [TestCaseSource(nameof(Notebooks))]
    public void Notebook_IsCommittedWithoutOutputs(string name)
    {
        foreach (var cell in Read(name).GetProperty("cells").EnumerateArray().Where(c => c.GetProperty("cell_type").GetString() == "code"))
        {
            Assert.That(cell.GetProperty("outputs").GetArrayLength(), Is.Zero);
            Assert.That(cell.GetProperty("execution_count").ValueKind, Is.EqualTo(JsonValueKind.Null));
        }
    }

    [Test]
    public void InteractivePackage_RunsItsSetUpWhenANotebookReferencesIt()
    {
        string folder = Path.Combine(RepositoryFiles.Root, "src", "ModelCompression.Interactive");
        var pack = XDocument.Load(Path.Combine(folder, "ModelCompression.Interactive.csproj")).Descendants("None")
            .Single(e => (string?)e.Attribute("Include") == "extension.dib");
        Assert.That((string?)pack.Attribute("PackagePath"), Is.EqualTo("interactive-extensions/dotnet/extension.dib"));
        Assert.That(File.ReadAllText(Path.Combine(folder, "extension.dib")), Does.Contain("ModelCompression.Interactive.ModelCompressionNotebook.Initialize();"));
    }
}
