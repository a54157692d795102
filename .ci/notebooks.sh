#!/usr/bin/env bash
# Runs every notebook in examples/notebooks headless and fails on any cell error.
#
# The notebooks reference this repository's packages the way a user references published ones: a local package
# source (#i "nuget: ../../artifacts/packages") and #r "nuget: <id>, <version>". This script packs the packages into a
# throwaway feed under a unique version (so the NuGet cache never serves an earlier run's build), runs copies of the
# notebooks rewritten to that feed and version with dotnet-repl from the repository's tool manifest, and checks every
# code cell passed. First it runs a notebook with a failing cell and requires that run to fail, so a broken runner
# cannot pass silently. Every process it starts runs in its own process group and is killed at the end.
#
#   bash .ci/notebooks.sh [OUTPUT_DIR]        (TRX results per notebook go to OUTPUT_DIR, default artifacts/ci/notebooks)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-artifacts/ci/notebooks}"
mkdir -p "$out"
out=$(cd "$out" && pwd)

work=$(mktemp -d)
version="0.1.0-nb.$(date +%s).$$"
feed="$work/feed"
groups=()
cleanup() {
  for g in "${groups[@]}"; do kill -KILL -- "-$g" 2> /dev/null || true; done
  rm -rf "$work"
  for p in modelcompression modelcompression.samples modelcompression.interactive; do rm -rf "${HOME}/.nuget/packages/$p/$version"; done
}
trap cleanup EXIT

dotnet tool restore > /dev/null
for p in ModelCompression ModelCompression.Samples ModelCompression.Interactive; do
  dotnet pack "src/$p/$p.csproj" -c Release -o "$feed" -p:Version="$version" --nologo > "$work/pack-$p.log" 2>&1 \
    || { cat "$work/pack-$p.log"; echo "packing $p failed"; exit 1; }
done

# Runs one notebook in a new process group (killed afterwards, whatever is left of it); sets rc to its exit code.
# Not called in $(...): the group must be recorded in this shell for the exit trap.
run_notebook() {
  local notebook=$1 trx=$2 log=$3 limit=$4
  setsid timeout -k 10 "$limit" dotnet tool run dotnet-repl -- --run "$notebook" --exit-after-run \
    --output-format trx --output-path "$trx" > "$log" 2>&1 &
  local pid=$!
  groups+=("$pid")
  rc=0
  wait "$pid" || rc=$?
  kill -KILL -- "-$pid" 2> /dev/null || true
}

counter() { grep -o "$1=\"[0-9]*\"" "$2" | head -1 | grep -o '[0-9]*'; }

echo "negative control: a notebook whose second cell throws must fail the run"
cat > "$work/failing.ipynb" <<'JSON'
{"cells": [
  {"cell_type": "code", "execution_count": null, "metadata": {"polyglot_notebook": {"kernelName": "csharp"}}, "outputs": [], "source": ["1 + 1"]},
  {"cell_type": "code", "execution_count": null, "metadata": {"polyglot_notebook": {"kernelName": "csharp"}}, "outputs": [], "source": ["throw new InvalidOperationException(\"a deliberately failing cell\");"]}
 ],
 "metadata": {"kernelspec": {"display_name": ".NET (C#)", "language": "C#", "name": ".net-csharp"},
              "polyglot_notebook": {"kernelInfo": {"defaultKernelName": "csharp", "items": [{"name": "csharp"}]}}},
 "nbformat": 4, "nbformat_minor": 5}
JSON
run_notebook "$work/failing.ipynb" "$work/failing.trx" "$work/failing.log" 300
if [ "$rc" -eq 0 ] || [ "$(counter failed "$work/failing.trx" || echo 0)" != 1 ]; then
  cat "$work/failing.log"; echo "the failing notebook did not fail the run (exit $rc)"; exit 1
fi
echo "the failing cell failed the run (exit $rc), as it must"

status=0
for notebook in examples/notebooks/*.ipynb; do
  name=$(basename "$notebook" .ipynb)
  copy="$work/$name.ipynb"
  # The feed and version of this run instead of artifacts/packages and the released versions.
  sed -E -e "s|#i \\\\\"nuget: [^\\\\]*\\\\\"|#i \\\\\"nuget: $feed\\\\\"|" \
         -e "s|(#r \\\\\"nuget: ModelCompression[A-Za-z.]*), [^\\\\]*\\\\\"|\\1, $version\\\\\"|" "$notebook" > "$copy"
  grep -q "nuget: $feed" "$copy" && grep -q "ModelCompression.Interactive, $version" "$copy" \
    || { echo "$notebook: could not point it at the packed packages"; exit 1; }
  cells=$(grep -c '"cell_type"' "$notebook")  # dotnet-repl reports markdown cells too, as passed
  start=$(date +%s)
  run_notebook "$copy" "$out/$name.trx" "$out/$name.log" 900
  passed=$(counter passed "$out/$name.trx" || echo 0)
  failed=$(counter failed "$out/$name.trx" || echo 0)
  echo "$name.ipynb: exit $rc, $passed of $cells cells passed, $failed failed, $(( $(date +%s) - start )) s"
  if [ "$rc" -ne 0 ] || [ "$passed" != "$cells" ] || [ "$failed" != 0 ]; then
    sed -e 's/&lt;/</g; s/&gt;/>/g; s/&quot;/"/g' "$out/$name.trx" | grep -A30 -i 'outcome="Failed"' | head -60 || cat "$out/$name.log"
    status=1
  fi
done
# The report and the charts rendered through the formatters the package registers on its own.
if [ "$status" -eq 0 ]; then
  grep -q 'mc-report' "$out/QuickStart.trx" || { echo "QuickStart.ipynb: the report was not rendered as HTML"; status=1; }
  grep -q '&lt;svg' "$out/TradeOffs.trx" || { echo "TradeOffs.ipynb: no chart was rendered"; status=1; }
fi
[ "$status" -eq 0 ] && echo "notebooks passed"
exit "$status"
