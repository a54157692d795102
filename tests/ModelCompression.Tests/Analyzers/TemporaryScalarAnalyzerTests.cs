using System.Collections.Immutable;
using Microsoft.CodeAnalysis;
using Microsoft.CodeAnalysis.CSharp;
using Microsoft.CodeAnalysis.Diagnostics;
using ModelCompression.Analyzers;
using NUnit.Framework;
using TorchSharp;

namespace ModelCompression.Tests.Analyzers;

[TestFixture]
public sealed class TemporaryScalarAnalyzerTests
{
    // Each case is one method body over tensors x and y; the analyzer must report MC0001 exactly when a Scalar that
    // nothing holds reaches LibTorch.
    [TestCase("return x + y;", true, TestName = "Flags_TensorPlusTensor")]
    [TestCase("return x * 2.0;", true, TestName = "Flags_TensorTimesNumber")]
    [TestCase("return 1 - x;", true, TestName = "Flags_NumberMinusTensor")]
    [TestCase("return x.add_(y);", true, TestName = "Flags_AddWithoutScale")]
    [TestCase("return x.pow(2);", true, TestName = "Flags_ImplicitConversionArgument")]
    [TestCase("return x.clamp(0, 6);", true, TestName = "Flags_ClampBounds")]
    [TestCase("return torch.arange(5);", true, TestName = "Flags_ArangeWithDefaults")]
    [TestCase("var s = 2.0.ToScalar(); return x.mul(s);", true, TestName = "Flags_ScalarInPlainLocal")]
    [TestCase("x.ToSingle(); return x;", true, TestName = "Flags_ValueReadThroughScalar")]
    [TestCase("Scalar s = 3; return x.mul(s);", true, TestName = "Flags_ImplicitConversionIntoPlainLocal")]
    [TestCase("using var s = 2.0.ToScalar(); return x.mul(s);", false, TestName = "Accepts_UsingDeclaration")]
    [TestCase("using (var s = 2.0.ToScalar()) { return x.mul(s); }", false, TestName = "Accepts_UsingStatement")]
    [TestCase("using var s = 2.ToScalar(); return x - s;", false, TestName = "Accepts_TensorMinusHeldScalar")]
    [TestCase("return x.add(y, Held);", false, TestName = "Accepts_FieldHeldScalar")]
    [TestCase("return (x - y) * y / x;", false, TestName = "Accepts_TensorOnlyArithmetic")]
    [TestCase("using var a = 1.ToScalar(); using var b = 6.ToScalar(); return torch.arange(a, b, a);", false, TestName = "Accepts_ArangeWithHeldScalars")]
    public void Mc0001_ReportsExactlyTheUnheldScalars(string body, bool reported)
    {
        var diagnostics = Analyze($$"""
            using TorchSharp;
            using static TorchSharp.torch;

            public static class Snippet
            {
                private static readonly Scalar Held = 1.ToScalar();

                public static Tensor Run(Tensor x, Tensor y)
                {
                    {{body}}
                }
            }
            """);
        Assert.That(diagnostics.Select(d => d.Id), reported ? Does.Contain(TemporaryScalarAnalyzer.DiagnosticId) : Is.Empty, string.Join("\n", diagnostics));
    }

    [Test]
    public void Mc0001_PointsAtTheExpressionAndSaysWhatMadeTheScalar()
    {
        var diagnostics = Analyze("""
            using static TorchSharp.torch;

            public static class Snippet
            {
                public static Tensor Run(Tensor x) => x.clamp_min(1e-8);
            }
            """);
        Assert.That(diagnostics, Has.Length.EqualTo(1));
        Assert.That(diagnostics[0].GetMessage(), Does.Contain("'1e-8' converted to a Scalar"));
        Assert.That(diagnostics[0].Location.GetLineSpan().StartLinePosition.Line, Is.EqualTo(4));
    }

    private static ImmutableArray<Diagnostic> Analyze(string source)
    {
        var platform = ((string)AppContext.GetData("TRUSTED_PLATFORM_ASSEMBLIES")!).Split(Path.PathSeparator)
            .Where(path => Path.GetFileName(path).StartsWith("System.", StringComparison.Ordinal) || Path.GetFileName(path) is "netstandard.dll" or "mscorlib.dll")
            .Select(path => MetadataReference.CreateFromFile(path));
        var compilation = CSharpCompilation.Create(
            "Snippet",
            [CSharpSyntaxTree.ParseText(source)],
            platform.Append(MetadataReference.CreateFromFile(typeof(torch).Assembly.Location)),
            new CSharpCompilationOptions(OutputKind.DynamicallyLinkedLibrary, nullableContextOptions: NullableContextOptions.Enable));
        var errors = compilation.GetDiagnostics().Where(d => d.Severity == DiagnosticSeverity.Error).ToList();
        Assert.That(errors, Is.Empty, "the snippet compiles");
        return compilation.WithAnalyzers([new TemporaryScalarAnalyzer()]).GetAnalyzerDiagnosticsAsync().GetAwaiter().GetResult();
    }
}
