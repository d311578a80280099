#!/usr/bin/env bash
# The GPU targets of issue 13, in one prepared run (about 8 minutes on an H100):
#   1. batch-1 decoding in-process vs the memory-bandwidth ceiling  (bench/decode.py, Gemma 3 4B shapes)
#   2. chest radiograph reports per hour through a running node, 1 / 8 / 32 in flight, against a
#      one-at-a-time generate loop on the same model  (bench/serving.py, a 4B-shaped random Gemma 3)
# Each writes its JSON to $OUT (decode.json, serving.json) and its log beside it; one failing does not
# stop the other. Render here afterwards:
#   .venv/bin/python bench/decode.py --from-json OUT/decode.json --write-docs
#   .venv/bin/python bench/serving.py --from-json OUT/serving.json --write-docs --section serving-gpu
#
# The node needs mednode's dependencies (celery, kombu, sqlalchemy, alembic, pynetdicom, pydicom,
# highdicom, fastapi, uvicorn, pydantic-settings, ...), which the GPU image (Python 3.12, torch,
# transformers, no dcmtk) lacks: download their wheels here for that machine's Python, carry them
# (run's carry: [".whl"]), and they are installed first, without an index (no dcmtk there: the
# benchmark then sends with pynetdicom). Without them part 2 is skipped and says why.
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
#     -d .whl pydicom pynetdicom highdicom pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg nibabel \
#     sqlalchemy greenlet alembic mako celery kombu billiard vine amqp click-didyoumean click-repl \
#     click-plugins prompt-toolkit wcwidth tzlocal redis pydantic pydantic-core pydantic-settings \
#     python-dotenv annotated-types typing-inspection fastapi starlette uvicorn python-multipart \
#     dicomweb-client retrying psycopg psycopg-binary monai
#
# A check of the script on a CPU, tiny sizes (a minute or two):
#   GPU_CHECK_SIZE=tiny GPU_CHECK_DEVICE=cpu PYTHON=.venv/bin/python OUT=/tmp/gc bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
PYTHON=${PYTHON:-python3}
SIZE=${GPU_CHECK_SIZE:-4b}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
if [ "$DEVICE" = cpu ]; then DTYPE=float32; TOKENS=${GPU_CHECK_TOKENS:-32}; else DTYPE=bfloat16; TOKENS=${GPU_CHECK_TOKENS:-256}; fi
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PYTHON" -m pip install --quiet --no-index --no-deps .whl/*.whl >"$OUT/pip.log" 2>&1 \
        || echo "pip install of .whl/ failed: see pip.log" >&2
fi
"$PYTHON" - <<'EOF' >"$OUT/env.json" 2>&1
import json, platform, torch, transformers
print(json.dumps({"python": platform.python_version(), "torch": torch.__version__,
                  "transformers": transformers.__version__, "cuda": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
EOF

# 1. decoding: eager vs static cache vs CUDA graphs, batch 1 (about 3 minutes on an H100)
if [ "$DEVICE" = cpu ]; then DECODE_ARGS=(--new-tokens 16 --rounds 1 --synthetic); else DECODE_ARGS=(--rounds 2 --synthetic); fi
timeout 240 "$PYTHON" bench/decode.py --device "$DEVICE" --size "$SIZE" "${DECODE_ARGS[@]}" \
    --json "$OUT/decode.json" >"$OUT/decode.log" 2>&1
echo "decode: exit $? ($(tail -c 300 "$OUT/decode.log" | tr '\n' ' '))"

# 2. the node: reports through C-STORE -> SR stored, 1/8/32 in flight (about 4 minutes on an H100);
#    32 job slots and prompts per generate call, so 32 studies in flight can share one call
if "$PYTHON" -c "import celery, sqlalchemy, pynetdicom, highdicom, fastapi, pydantic_settings" 2>"$OUT/serving.log"; then
    timeout 300 "$PYTHON" bench/serving.py --paths inprocess --kinds cr --size "$SIZE" --device "$DEVICE" \
        --dtype "$DTYPE" --new-tokens "$TOKENS" --studies 1:2,8:16,32:32 --batch-size 32 --workers 32 \
        --baseline-repeats 1 --threads 4 --quiet-period-s 1 --timeout-s 200 --workdir "$OUT" \
        --json "$OUT/serving.json" >>"$OUT/serving.log" 2>&1
    echo "serving: exit $? ($(grep -E 'studies/h|baseline|error|Error' "$OUT/serving.log" | tail -n 6 | tr '\n' ' '))"
else
    echo "serving: skipped, mednode's dependencies are missing (put their wheels in .whl/): $(tail -n 1 "$OUT/serving.log")"
fi
