using NUnit.Framework;

namespace ModelCompression.Tests.Support;

/// <summary>Files of the repository the tests run from (the README, notebooks, project files).</summary>
internal static class RepositoryFiles
{
    /// <summary>Gets the repository's root folder: the nearest ancestor of the test output that holds the solution.</summary>
    public static string Root
    {
        get
        {
            for (var dir = new DirectoryInfo(TestContext.CurrentContext.TestDirectory); dir is not null; dir = dir.Parent)
            {
                if (File.Exists(Path.Combine(dir.FullName, "ModelCompression.sln")))
                {
                    return dir.FullName;
                }
            }

            throw new InvalidOperationException("The tests do not run inside the repository.");
        }
    }
}
