# shellcheck shell=bash
# Source me: puts the project's toolchain pieces on the path for cargo build / cargo test.
#   source scripts/env.sh
DINOFLOW_CACHE="${DINOFLOW_CACHE:-$HOME/.cache/dinoflow}"
export DINOFLOW_CACHE
export DINOFLOW_VENV="${DINOFLOW_VENV:-$DINOFLOW_CACHE/venv}"
if [[ -d "$DINOFLOW_VENV" ]]; then
  export VIRTUAL_ENV="$DINOFLOW_VENV"
  case ":$PATH:" in *":$DINOFLOW_VENV/bin:"*) ;; *) export PATH="$DINOFLOW_VENV/bin:$PATH" ;; esac
  # tch builds against the libtorch inside the venv's torch wheel.
  export LIBTORCH_USE_PYTORCH=1
  # NCCL from the nvidia-nccl wheel: cudarc dlopens libnccl.so (setup.sh adds that link).
  for _lib in "$DINOFLOW_VENV"/lib/python3*/site-packages/nvidia/nccl/lib "$DINOFLOW_VENV"/lib/python3*/site-packages/torch/lib; do
    [[ -d "$_lib" ]] || continue
    case ":${LD_LIBRARY_PATH:-}:" in *":$_lib:"*) ;; *) export LD_LIBRARY_PATH="$_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;; esac
  done
  unset _lib
fi
case ":$PATH:" in *":$DINOFLOW_CACHE/bin:"*) ;; *) export PATH="$DINOFLOW_CACHE/bin:$PATH" ;; esac
case ":$PATH:" in *":$HOME/.cargo/bin:"*) ;; *) export PATH="$HOME/.cargo/bin:$PATH" ;; esac
# One build directory for every clone (CI builds a fresh clone each time): warm runs then
# recompile only the project's own crates. Override by exporting CARGO_TARGET_DIR first.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$DINOFLOW_CACHE/target}"
