"""Regenerates tests/MinLora.Glm.Tests/Fixtures/tokenizer/minlora_unigram.model and minlora_ids.json.

Run with Debian's Python and its sentencepiece (apt-get install sentencepiece python3-sentencepiece):
    /usr/bin/python3 tools/tokenizer/make_fixture.py
It trains a small SentencePiece Unigram model with ChatGLM-6B's trainer settings (byte fallback, split digits,
pad id 3, <n>/<|tab|>/<|blank_N|> user-defined symbols, the eight ChatGLM control symbols) on corpus.txt after
ChatGLM's preprocessing, then records the ids Python sentencepiece gives for test texts (after the same
preprocessing), which the C# tests compare with GlmTokenizer.
"""
import json, os, subprocess, sys, tempfile
import sentencepiece as spm

here = os.path.dirname(os.path.abspath(__file__))
out = os.path.join(here, "..", "..", "tests", "MinLora.Glm.Tests", "Fixtures", "tokenizer")

def preprocess(text):  # tokenization_chatglm.py SPTokenizer._preprocess
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for i in range(80, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return text

user = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]
control = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(os.path.join(here, "corpus.txt"), encoding="utf-8") as f, open(corpus, "w", encoding="utf-8") as g:
        for para in f.read().split("\n"):
            g.write(preprocess(para) + "\n")
    prefix = os.path.join(tmp, "minlora_unigram")
    subprocess.run(["spm_train", f"--input={corpus}", f"--model_prefix={prefix}", "--model_type=unigram",
                    "--vocab_size=700", "--character_coverage=0.9999", "--split_digits=true", "--byte_fallback=true",
                    "--pad_id=3", "--unk_id=0", "--bos_id=1", "--eos_id=2",
                    "--user_defined_symbols=" + ",".join(user), "--control_symbols=" + ",".join(control),
                    "--hard_vocab_limit=false", "--minloglevel=2"], check=True)
    os.makedirs(out, exist_ok=True)
    with open(prefix + ".model", "rb") as src, open(os.path.join(out, "minlora_unigram.model"), "wb") as dst:
        dst.write(src.read())

sp = spm.SentencePieceProcessor(model_file=os.path.join(out, "minlora_unigram.model"))
texts = [
    "你好", "汽车发动机故障需要诊断仪检测。", "Hello, world!", "The quick brown fox.",
    "def f(x):\n    return x  *  2\n", "tab\tseparated\tvalues", "line one\nline two\n\nline four",
    "Numbers 12345 and 3.14159", "emoji 🚗 and 👋 and 🙂", "  leading and trailing  ", "x" + " " * 85 + "y",
    "全角，标点：测试！", "混合 mixed 文本 text 123", "", " ", "部件故障_发动机_异响\n检测工具_诊断仪_故障码",
    "unseen characters: Ω ∑ ∂ ж ק", "C# code: public int X { get; } = 42;",
]
cases = []
for t in texts:
    pre = preprocess(t)
    cases.append({"text": t, "preprocessed": pre, "ids": sp.encode(pre), "pieces": sp.encode(pre, out_type=str),
                  "ids_no_dummy_prefix": sp.encode("<n>" + pre)[2:], "decoded": sp.decode(sp.encode(pre))})
special = {p: sp.piece_to_id(p) for p in control + ["<n>", "<pad>", "<unk>"]}
with open(os.path.join(out, "minlora_ids.json"), "w", encoding="utf-8") as f:
    json.dump({"sentencepiece": spm.__version__, "pieces": sp.get_piece_size(), "special_ids": special, "cases": cases}, f, ensure_ascii=False, indent=1)
print("wrote", out, sp.get_piece_size(), "pieces")
