using ModelCompression.Tests.Serialization;

namespace ModelCompression.Tests;

/// <summary>
/// The test assembly's entry point. Test runners load the assembly as a library and never call it; tests that must
/// see a native crash instead of dying with it start the assembly as a child process (<c>dotnet exec</c>) with a command.
/// </summary>
internal static class Program
{
    public static int Main(string[] args) => args switch
    {
        [ChildProcessFuzzTests.Command, var first, var count] => ChildProcessFuzzTests.RunCases(int.Parse(first), int.Parse(count), Console.Out),
        _ => Usage(),
    };

    private static int Usage()
    {
        Console.Error.WriteLine($"usage: dotnet exec ModelCompression.Tests.dll {ChildProcessFuzzTests.Command} <first case> <cases>");
        return 2;
    }
}
