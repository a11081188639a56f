#!/bin/bash
# Builds chatglm.cpp (the peer in issue 9) and times it on ChatGLM-6B with random weights, on this machine.
#
#   benchmarks/peer/chatglm_cpp.sh SRC WORK [f16|q8_0|q4_0 ...]
#   ARCH=chatglm3 CHATGLM3_TOKENIZER=SPM.model benchmarks/peer/chatglm_cpp.sh SRC WORK [f16|q8_0|q4_0 ...]
#
# SRC: a chatglm.cpp checkout with its third_party/ggml submodule (measured: li-plus/chatglm.cpp f86777c, ggml
# f4ee239). WORK: a scratch directory (the build and one model file at a time: 3.5 GB q4_0, 6.6 GB q8_0, 12.4 GB f16;
# the same within 0.1 GB for ChatGLM3). The SentencePiece proto comes from CHATGLM_TOKENIZER (default
# ../shared/data/chatglm-6b/ice_text.model). ARCH=chatglm3 times ChatGLM3-6B instead (chatglm.cpp's model type 3,
# chatglm3-6b-random-TYPE.bin) with the SentencePiece model CHATGLM3_TOKENIZER (required: any model, e.g. one made by
# spm_train as write_random_chatglm_ggml.py's docstring shows).
# Needs: cmake, g++, libsentencepiece-dev, libre2-dev (Debian 12), numpy for /usr/bin/python3.
#
# Two local changes to the copy that is built, on neither ChatGLM-6B's nor ChatGLM3's path: Debian's sentencepiece and
# re2 libraries instead of the vendored sentencepiece, abseil and re2 submodules, and GLM-4's tokenizer (which needs
# protobuf's Base64Unescape) made to throw. ggml is built with -march=native and 2 threads are used (chatglm.cpp's
# default on a 2-core machine), as in the issue's measurement. Each type: a 16-token and a ~130-token prompt (counted
# by ChatGLM-6B's tokenizer; another counts otherwise), 64 new tokens, greedy.
set -euo pipefail
SRC=$(realpath "$1"); WORK=$(realpath -m "$2"); shift 2
TYPES=${*:-q4_0 q8_0 f16}
HERE=$(dirname "$(realpath "$0")")
ARCH=${ARCH:-chatglm}
case "$ARCH" in
  chatglm) TOKENIZER=${CHATGLM_TOKENIZER:-$HERE/../../../shared/data/chatglm-6b/ice_text.model}
    NAME=chatglm-6b; WRITER_ARGS=() ;;
  chatglm3) TOKENIZER=${CHATGLM3_TOKENIZER:?ARCH=chatglm3 needs CHATGLM3_TOKENIZER (a SentencePiece model)}
    NAME=chatglm3-6b; WRITER_ARGS=(--arch chatglm3) ;;
  *) echo "ARCH must be chatglm or chatglm3, not $ARCH" >&2; exit 2 ;;
esac
mkdir -p "$WORK"
if [ ! -x "$WORK/build/bin/main" ]; then
  rm -rf "$WORK/src" && cp -r "$SRC" "$WORK/src"
  python3 - "$WORK/src" <<'PY'
import sys
root = sys.argv[1]

def patch(path, pairs):
    text = open(path).read()
    for old, new in pairs:
        if old not in text:
            sys.exit(f"{path}: '{old}' not found: this chatglm.cpp differs from the measured one (f86777c)")
        text = text.replace(old, new)
    open(path, "w").write(text)

patch(f"{root}/CMakeLists.txt", [
    ("include_directories(third_party/sentencepiece/src)", ""),   # Debian's headers, matching its library
    ("add_subdirectory(third_party/sentencepiece)", ""),
    ("include_directories(third_party/sentencepiece/third_party/protobuf-lite)", ""),
    ("add_subdirectory(third_party/abseil-cpp)", ""),
    ("add_subdirectory(third_party/re2)", ""),
    ("target_link_libraries(chatglm PUBLIC ggml sentencepiece-static re2)", "target_link_libraries(chatglm PUBLIC ggml sentencepiece re2)"),
])
patch(f"{root}/chatglm.cpp", [
    ("#include <google/protobuf/stubs/strutil.h>\n", ""),
    ("CHATGLM_CHECK(google::protobuf::Base64Unescape(base64_token, &token));", 'CHATGLM_THROW << "GLM-4 tokenizer not built (peer benchmark)";'),
])
PY
  cmake -S "$WORK/src" -B "$WORK/build" -DCMAKE_BUILD_TYPE=Release -DCMAKE_C_FLAGS=-march=native -DCMAKE_CXX_FLAGS=-march=native \
    -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON > "$WORK/cmake.log"
  cmake --build "$WORK/build" -j 2 --target main > "$WORK/build.log"
fi
SHORT="请从下面的句子中抽取三元组：车主反映刹车片烧蚀。"
LONG=$(python3 -c "print('请从下面的句子中抽取主语、谓语和宾语组成的三元组，并按照主语_谓语_宾语的格式逐行输出。' * 4)")
for T in $TYPES; do
  MODEL="$WORK/$NAME-random-$T.bin"
  /usr/bin/python3 "$HERE/write_random_chatglm_ggml.py" "$MODEL" "$T" "$TOKENIZER" ${WRITER_ARGS[@]+"${WRITER_ARGS[@]}"}
  cat "$MODEL" > /dev/null   # into the page cache: chatglm.cpp maps the file
  for P in "$SHORT" "$LONG"; do
    echo "=== $T, prompt of $(echo -n "$P" | wc -m) characters"
    /usr/bin/time -v "$WORK/build/bin/main" -m "$MODEL" --mode generate -p "$P" --max_new_tokens 64 --top_k 1 --temp 0 -v \
      >"$WORK/out.log" 2>"$WORK/time.log" || { echo "chatglm.cpp failed:"; tail -5 "$WORK/out.log" "$WORK/time.log"; exit 1; }
    grep -E "ms/token" "$WORK/out.log"
    grep -E "Maximum resident" "$WORK/time.log"
  done
  rm -f "$MODEL"
done
