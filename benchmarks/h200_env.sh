# Source on the lent NVIDIA host after ../shared/gpu's setup.sh (see benchmarks/README.md):
#   bash .gpu2/setup.sh && source benchmarks/h200_env.sh && synth_q4 && $B --banks 25%
# Sets the import path, keeps MLX's compiled kernels in $HOME/ptx (restored from
# .gpucache/ptx.tar.xz when carried: a fresh host otherwise compiles for minutes; save them
# back with `saveptx`, which writes $OUT/ptx.tar.xz), and defines:
#   synth_q4  4 layers of the Qwen3.5-397B geometry (bf16 scales, realistic routing) in $W/q4 and
#             its layout in $W/q4.layout (~60 s), then reads every file once: the converter drops
#             the page cache, and a profile of a cold layout measures the disk
#   B         flashmoe-bench gpu on that layout (staged residency, split 4), stock mlx-lm included
export PYTHONPATH=$HOME/site PYTHONSAFEPATH=1
export MLX_PTX_CACHE_DIR=$HOME/ptx
mkdir -p "$HOME/ptx"
if [ -f .gpucache/ptx.tar.xz ] && [ ! -f "$HOME/ptx/.restored" ]; then
  tar xJf .gpucache/ptx.tar.xz -C "$HOME/ptx" && touch "$HOME/ptx/.restored"
fi
W=$HOME/w
mkdir -p "$W"
synth_q4() {
  if [ ! -d "$W/q4.layout" ]; then
    local t0
    t0=$(date +%s)
    python3 -m flashmoe.bench.cli synth --preset qwen3.5-397b --layers 4 -o "$W/q4" \
      --layout "$W/q4.layout" --dtype bfloat16 --quiet --no-check > "$W/synth.log" 2>&1
    echo "synth: rc=$? in $(( $(date +%s) - t0 )) s"
  fi
  find "$W/q4" "$W/q4.layout" -type f -exec cat {} + > /dev/null
}
B="python3 -m flashmoe.bench.cli gpu $W/q4.layout --source $W/q4 --modes staged --splits 4"
saveptx() { tar cJf "$OUT/ptx.tar.xz" -C "$HOME/ptx" . ; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader
