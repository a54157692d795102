// Benchmarks: dotnet run -c Release --project benchmarks/ModelCompression.Benchmarks -- --filter '*'
// (BenchmarkDotNet's own arguments; e.g. --filter '*Zoo*' --job short for a quick look).
using BenchmarkDotNet.Running;

BenchmarkSwitcher.FromAssembly(typeof(Program).Assembly).Run(args);
