"""Builds the SPO sample's tokenizer: samples/MinLora.Samples.SpoExtraction/assets/base/{ice_text.model, tokenizer_config.json}
(the base model's directory: one copy of the tokenizer, read by build-base and shipped with the model).

Run with Debian's spm_train on PATH (apt-get install sentencepiece):  /usr/bin/python3 tools/spo/make_tokenizer.py
A SentencePiece Unigram model with ChatGLM-6B's trainer settings (byte fallback, split digits, pad id 3, <n>/<|tab|>/
<|blank_N|> user symbols and ChatGLM's eight control symbols), trained on the sample's synthetic training texts, answers
and prompts after ChatGLM's preprocessing. Then build the base model with
    dotnet run --project tools/spo/MinLora.Tools.Spo -- build-base samples/MinLora.Samples.SpoExtraction/assets/base samples/MinLora.Samples.SpoExtraction/assets/base
"""
import json, os, subprocess, tempfile

here = os.path.dirname(os.path.abspath(__file__))
sample = os.path.join(here, "..", "..", "samples", "MinLora.Samples.SpoExtraction")
out = os.path.join(sample, "assets", "base")

def preprocess(text):
    text = text.replace("\n", "<n>").replace("\t", "<|tab|>")
    for i in range(80, 1, -1):
        text = text.replace(" " * i, f"<|blank_{i}|>")
    return text

lines = ["按给定的格式抽取文本信息。\n文本：", "复述文本：", "列出部件：", "部件故障 性能故障 组成 检测工具"]
with open(os.path.join(sample, "data", "train.jsonl"), encoding="utf-8") as f:
    for row in f:
        r = json.loads(row)
        lines += [r["text"], r["answer"]]
user = ["<n>", "<|tab|>"] + [f"<|blank_{i}|>" for i in range(2, 81)]
control = ["[MASK]", "[gMASK]", "[sMASK]", "<unused_0>", "<sop>", "<eop>", "<ENC>", "<dBLOCK>"]
with tempfile.TemporaryDirectory() as tmp:
    corpus = os.path.join(tmp, "corpus.txt")
    with open(corpus, "w", encoding="utf-8") as g:
        for line in lines:
            g.write(preprocess(line) + "\n")
    prefix = os.path.join(tmp, "spo")
    subprocess.run(["spm_train", f"--input={corpus}", f"--model_prefix={prefix}", "--model_type=unigram", "--vocab_size=600",
                    "--character_coverage=1.0", "--split_digits=true", "--byte_fallback=true", "--pad_id=3", "--unk_id=0",
                    "--bos_id=1", "--eos_id=2", "--user_defined_symbols=" + ",".join(user), "--control_symbols=" + ",".join(control),
                    "--hard_vocab_limit=false", "--minloglevel=2"], check=True)
    os.makedirs(out, exist_ok=True)
    with open(prefix + ".model", "rb") as src, open(os.path.join(out, "ice_text.model"), "wb") as dst:
        dst.write(src.read())
with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<sop>", "eos_token": "<eop>", "gmask_token": "[gMASK]", "mask_token": "[MASK]", "pad_token": "<pad>",
               "unk_token": "<unk>", "num_image_tokens": 0, "tokenizer_class": "ChatGLMTokenizer"}, f, indent=2)
print("wrote", out)
