#!/usr/bin/env bash
# Packs ModelCompression into a local folder, creates a throwaway console app that references it (plus
# TorchSharp-cpu) from that folder, and runs one TorchSharp call through the library. On a Linux machine whose
# libstdc++ lacks GLIBCXX_3.4.32 it also builds the app with the fix turned off and expects the call to fail,
# proving that the package's buildTransitive targets are what makes TorchSharp load.
set -euo pipefail
cd "$(dirname "$0")/.."

work=$(mktemp -d)
trap 'rm -rf "$work"; rm -rf "${HOME}/.nuget/packages/modelcompression/${version:-none}"' EXIT
# A unique version, so the NuGet cache never serves a stale copy of an earlier run's package.
version="0.1.0-ci.$(date +%s).$$"
feed="$work/feed"

dotnet pack src/ModelCompression/ModelCompression.csproj -c Release -o "$feed" -p:Version="$version" --nologo
list_zip() { if command -v unzip > /dev/null; then unzip -l "$1"; else python3 -m zipfile -l "$1"; fi; }
list_zip "$feed/ModelCompression.$version.nupkg" | grep -q 'buildTransitive/ModelCompression.targets' \
  || { echo "the package lacks buildTransitive/ModelCompression.targets"; exit 1; }

# App -> Lib -> ModelCompression: the app gets the package only transitively, as most applications would,
# so this exercises the buildTransitive path.
lib="$work/lib"
app="$work/consumer"
mkdir -p "$lib" "$app"
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
cat > "$app/Consumer.csproj" <<XML
<Project Sdk="Microsoft.NET.Sdk">
  <PropertyGroup>
    <OutputType>Exe</OutputType>
    <TargetFramework>net10.0</TargetFramework>
    <Nullable>enable</Nullable>
    <ImplicitUsings>enable</ImplicitUsings>
  </PropertyGroup>
  <ItemGroup>
    <ProjectReference Include="../lib/Lib.csproj" />
    <PackageReference Include="TorchSharp-cpu" Version="0.107.0" />
  </ItemGroup>
</Project>
XML
cat > "$app/Program.cs" <<'CS'
using static TorchSharp.torch;

using var layer = nn.Linear(20, 30);
using var input = ones(1, 20);
Console.WriteLine($"consumer: {Lib.Sizes.Describe(layer, input)}");
CS
# Keep the repository's Directory.Build.* files out of the throwaway apps.
echo "<Project />" > "$work/Directory.Build.props"; echo "<Project />" > "$work/Directory.Build.targets"; echo "<Project />" > "$work/Directory.Packages.props"

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
echo "consumer check passed"
