#!/usr/bin/env bash
# Packs ModelCompression into a local folder and checks it the way a user meets it:
#  1. a fresh console app that references only the packed package and TorchSharp-cpu trains a small model, compresses
#     it with a pipeline (pruning, then int8) and prints the report; the check reads the report's figures;
#  2. an app that gets the package only through a class library (the buildTransitive path) runs a TorchSharp call
#     from its build output and from a linux-x64 publish; on a Linux machine whose libstdc++ lacks GLIBCXX_3.4.32 the
#     same app built with the fix turned off must fail, proving the package's targets are what makes TorchSharp load;
#  3. Source Link: packed from a clone whose origin is a GitHub URL, the symbol package's PDB maps the sources to
#     that repository at the packed commit (this repository's own origin may be a local path, which maps nowhere).
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"; rm -rf "${HOME}/.nuget/packages/modelcompression/${version:-none}"' EXIT
# A unique version, so the NuGet cache never serves a stale copy of an earlier run's package.
version="0.1.0-ci.$(date +%s).$$"
feed="$work/feed"

dotnet pack src/ModelCompression/ModelCompression.csproj -c Release -o "$feed" -p:Version="$version" --nologo
list_zip() { if command -v unzip > /dev/null; then unzip -l "$1"; else python3 -m zipfile -l "$1"; fi; }
contents=$(list_zip "$feed/ModelCompression.$version.nupkg")
for entry in README.md LICENSE lib/net10.0/ModelCompression.dll lib/net10.0/ModelCompression.xml \
    buildTransitive/ModelCompression.targets buildTransitive/ModelCompression.GlibcxxNeed.cs build/ModelCompression.targets; do
  echo "$contents" | grep -qE "(^| )$entry( |\$)" || { echo "the package lacks $entry"; exit 1; }
done
test -s "$feed/ModelCompression.$version.snupkg" || { echo "no symbol package beside the package"; exit 1; }

cat > "$work/nuget.config" <<XML
<?xml version="1.0" encoding="utf-8"?>
<configuration>
  <packageSources>
    <clear />
    <add key="local" value="$feed" />
    <add key="nuget.org" value="https://api.nuget.org/v3/index.json" />
  </packageSources>
</configuration>
XML

# 1. The pipeline consumer: the package and TorchSharp-cpu, nothing else.
pipe="$work/pipeline"
mkdir -p "$pipe"
# Keep the repository's Directory.Build.* files out of the throwaway apps.
echo "<Project />" > "$work/Directory.Build.props"; echo "<Project />" > "$work/Directory.Build.targets"; echo "<Project />" > "$work/Directory.Packages.props"
# A console app's project file holding the given items.
console_project() {
  cat <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <Nullable>enable</Nullable>
    <ImplicitUsings>enable</ImplicitUsings>
    <TreatWarningsAsErrors>true</TreatWarningsAsErrors>
  </PropertyGroup>
  <ItemGroup>
$1
    <PackageReference Include="TorchSharp-cpu" Version="0.107.0" />
  </ItemGroup>
</Project>
XML
}
console_project "    <PackageReference Include=\"ModelCompression\" Version=\"$version\" />" > "$pipe/PipelineConsumer.csproj"
cat > "$pipe/Program.cs" <<'CS'
using ModelCompression;
using ModelCompression.Data;
using ModelCompression.Pruning;
using ModelCompression.Quantization;
using ModelCompression.Training;
using static TorchSharp.torch;

// Four classes of points in 32 dimensions around random centres, 4,000 to train on and 1,000 to test on.
var generator = new TorchSharp.torch.Generator(7);
var centres = randn([4, 32], generator: generator) * 1.5;
TensorDataset Blobs(int count)
{
    var labels = arange(count, dtype: ScalarType.Int64) % 4;
    return new TensorDataset(centres[labels] + randn([count, 32], generator: generator), labels);
}

using var train = Blobs(4000);
using var test = Blobs(1000);
using var model = nn.Sequential(nn.Linear(32, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 4));
new Trainer(new TrainingOptions { Epochs = 4, Optimizer = OptimizerKind.Adam, LearningRate = 1e-3 }).Train(model, train);

using var result = CompressionPipeline.Create()
    .AddMagnitudePruning(0.8)
    .AddPostTrainingQuantization(QuantizationMode.DynamicInt8)
    .WithAccuracyCheck(maxDrop: 0.02, AccuracyCheckPolicy.SkipStep)
    .WithModelName("blobs-mlp")
    .WithSeed(0)
    .Build()
    .Run(model, new CompressionData(train, test));
Console.WriteLine(result.Report);
Console.WriteLine($"steps accepted: {result.Report.Steps.Count(s => s.Accepted)} of {result.Report.Steps.Count}");
Console.WriteLine($"final accuracy: {result.Report.Final.Accuracy:0.0000}");
Console.WriteLine($"compression ratio: {result.Report.CompressionRatio:0.00}");
CS
dotnet build "$pipe/PipelineConsumer.csproj" -c Release -o "$pipe/out" --nologo > "$work/pipeline-build.log" 2>&1 \
  || { cat "$work/pipeline-build.log"; echo "the pipeline consumer did not build"; exit 1; }
report=$(dotnet "$pipe/out/PipelineConsumer.dll") || { echo "$report"; echo "the pipeline consumer failed"; exit 1; }
echo "$report"
echo "$report" | grep -q '^steps accepted: 2 of 2$' || { echo "the consumer's pipeline did not accept both steps"; exit 1; }
accuracy=$(echo "$report" | sed -n 's/^final accuracy: //p')
ratio=$(echo "$report" | sed -n 's/^compression ratio: //p')
awk -v a="$accuracy" -v r="$ratio" 'BEGIN { exit !(a >= 0.9 && r >= 8) }' \
  || { echo "the consumer's compressed model is off: accuracy $accuracy, ratio $ratio (expected >= 0.9 and >= 8)"; exit 1; }
echo "pipeline consumer: accuracy $accuracy, $ratio x smaller, from the package alone"

# 2. App -> Lib -> ModelCompression: the app gets the package only transitively, as most applications would,
# so this exercises the buildTransitive path.
lib="$work/lib"
app="$work/consumer"
mkdir -p "$lib" "$app"
cat > "$lib/Lib.csproj" <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <TargetFramework>net10.0</TargetFramework>
    <Nullable>enable</Nullable>
    <ImplicitUsings>enable</ImplicitUsings>
  </PropertyGroup>
  <ItemGroup>
    <PackageReference Include="ModelCompression" Version="$version" />
  </ItemGroup>
</Project>
XML
cat > "$lib/Sizes.cs" <<'CS'
using ModelCompression.Metrics;
using static TorchSharp.torch;

namespace Lib;

public static class Sizes
{
    public static string Describe(nn.Module<Tensor, Tensor> layer, Tensor input) =>
        $"{ModelMetrics.CountParameters(layer)} parameters, {ModelMetrics.CountMacs(layer, input)} MACs";
}
CS
console_project '    <ProjectReference Include="../lib/Lib.csproj" />' > "$app/Consumer.csproj"
cat > "$app/Program.cs" <<'CS'
using static TorchSharp.torch;

using var layer = nn.Linear(20, 30);
using var input = ones(1, 20);
Console.WriteLine($"consumer: {Lib.Sizes.Describe(layer, input)}");
CS

dotnet build "$app/Consumer.csproj" -c Release -o "$app/out" --nologo 2>&1 | tee "$work/build.log"
output=$(dotnet "$app/out/Consumer.dll")
echo "$output"
[ "$output" = "consumer: 630 parameters, 600 MACs" ] || { echo "unexpected consumer output"; exit 1; }

echo "publish for linux-x64 (framework-dependent) and run the published app"
dotnet publish "$app/Consumer.csproj" -c Release -r linux-x64 --self-contained false -o "$app/pub" --nologo 2>&1 | tee "$work/publish.log"
output=$(dotnet "$app/pub/Consumer.dll")
[ "$output" = "consumer: 630 parameters, 600 MACs" ] || { echo "unexpected output from the published app: $output"; exit 1; }
echo "published app: $output"

needs_fix=false
if [ "$(uname -s)" = Linux ]; then
  needs_fix=true
  for lib in /usr/lib/x86_64-linux-gnu/libstdc++.so.6 /usr/lib/aarch64-linux-gnu/libstdc++.so.6 /usr/lib64/libstdc++.so.6; do
    if [ -f "$lib" ] && grep -q 'GLIBCXX_3.4.32' "$lib"; then needs_fix=false; fi
  done
fi

if $needs_fix; then
  grep -q 'marked the GLIBCXX_3.4.32 version need weak' "$work/build.log" \
    || { echo "the build did not log the libstdc++ fix"; exit 1; }
  grep -q 'marked the GLIBCXX_3.4.32 version need weak.*modelcompression-patched' "$work/publish.log" \
    || { echo "the publish did not patch its copy"; exit 1; }
  echo "negative control: the same app built with the fix turned off must fail to load TorchSharp"
  dotnet build "$app/Consumer.csproj" -c Release -o "$app/unpatched" -p:ModelCompressionPatchLibTorchSharp=false --nologo > /dev/null
  if dotnet "$app/unpatched/Consumer.dll" > "$work/unpatched.log" 2>&1; then
    echo "without the fix TorchSharp loaded anyway: the check proves nothing here"; exit 1
  fi
  grep -Eq 'DllNotFoundException|TypeInitializationException' "$work/unpatched.log" \
    || { cat "$work/unpatched.log"; echo "unexpected failure without the fix"; exit 1; }
  echo "without the fix: $(grep -Eo '(DllNotFoundException|TypeInitializationException)' "$work/unpatched.log" | head -1), as expected"
else
  echo "this machine's libstdc++ has GLIBCXX_3.4.32 (or it is not Linux): no patch needed, none applied"
fi
# 3. Source Link, from a clone of the committed tree whose origin is a GitHub URL (a hosted repository's case).
sl_url="${MC_SOURCELINK_TEST_URL:-https://github.com/modelcompression/ModelCompression}"
sl="$work/sourcelink"
git clone -q --no-hardlinks . "$sl/repo"
commit=$(git -C "$sl/repo" rev-parse HEAD)
git -C "$sl/repo" remote set-url origin "$sl_url.git"
dotnet pack "$sl/repo/src/ModelCompression/ModelCompression.csproj" -c Release -o "$sl/feed" -p:Version="$version" --nologo > "$sl/pack.log" 2>&1 \
  || { cat "$sl/pack.log"; echo "packing the Source Link clone failed"; exit 1; }
extract_zip() { if command -v unzip > /dev/null; then unzip -q -o "$1" -d "$2"; else python3 -m zipfile -e "$1" "$2"; fi; }
extract_zip "$sl/feed/ModelCompression.$version.snupkg" "$sl/symbols"
extract_zip "$sl/feed/ModelCompression.$version.nupkg" "$sl/package"
raw="https://raw.githubusercontent.com/${sl_url#https://github.com/}/$commit/*"
grep -aqF "$raw" "$sl/symbols/lib/net10.0/ModelCompression.pdb" \
  || { echo "the symbol package's PDB does not map the sources to $raw"; exit 1; }
grep -qF "commit=\"$commit\"" "$sl/package/ModelCompression.nuspec" && grep -qF "url=\"$sl_url.git\"" "$sl/package/ModelCompression.nuspec" \
  || { grep repository "$sl/package/ModelCompression.nuspec"; echo "the package does not name its repository and commit"; exit 1; }
echo "Source Link: the PDB in the .snupkg maps the sources to $raw; the .nuspec names the repository and commit"
echo "consumer check passed"
