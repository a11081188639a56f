#!/usr/bin/env python3
"""Writes ChatGLM-6B (model type 1) or ChatGLM3-6B (model type 3) with random weights in chatglm.cpp's GGML file format.

chatglm.cpp loads only files made by its convert.py from a Hugging Face checkpoint, and no checkpoint can be downloaded
here, so this writes the same layout directly: magic, model type, config (version 2), the SentencePiece model proto,
then every tensor (name, shape, GGML type, data aligned to 16 bytes) in convert.py's order. The 2-D weights are in the
requested type: f16, q8_0 (f16 scale + 32 int8 per block) or q4_0 (f16 scale + 16 bytes of nibbles); the 1-D ones
(norms, biases) are f32. Values are random and of a trained model's size (about N(0, 0.02)); a chunk of random blocks is
written repeatedly, which does not matter for timing (the model is far beyond any cache).

--arch chatglm (the default): ChatGLM-6B's config.json; the embedding (tied to the head) and the four projections of
each block are 2-D, LayerNorm with bias, every linear with bias.

--arch chatglm3: ChatGLM3-6B's config.json (padded vocabulary 65,024, hidden 4,096, 28 layers, 32 heads, 2 key/value
groups of 128, FFN 13,696, RMSNorm eps 1e-5, 8,192 positions, rope theta 10,000, eos 2, pad 0). Per block: RMSNorm,
query_key_value (4,608 x 4,096 with an f32 bias), dense (no bias), RMSNorm, dense_h_to_4h (27,392 x 4,096: the gate's
13,696 rows, then the up projection's; chatglm.cpp splits it by bytes) and dense_4h_to_h (4,096 x 13,696); then the
final RMSNorm and an untied output_layer (65,024 x 4,096, quantized like the embedding).
chatglm.cpp numbers ChatGLM3's nine special tokens ([MASK], [gMASK], [sMASK], sop, eop, <|system|>, <|user|>,
<|assistant|>, <|observation|>) from the proto's piece count on, and decodes every other generated id with
SentencePiece's IdToPiece, which does not check the range. A random model's greedy choice can be any of the 65,024
rows, so the proto is padded here with UNUSED pieces ("<unused_N>": never produced by encoding) up to 65,015 pieces:
every id then decodes, and the special ids are 65,015..65,023 (the real tokenizer has 64,789 pieces, specials
64,789..64,797, which a trained model never exceeds). The proto needs no special pieces of its own, only what any
SentencePiece model has (<unk>); ChatGLM3's own has byte fallback (its ids 3..258 are <0x00>..<0xFF>).

ChatGLM3's tokenizer.model cannot be downloaded here; any SentencePiece model will do, e.g. one trained with Debian's
sentencepiece package (spm_train) on the project's Chinese data (from the repository's root):

  python3 -c "import json, sys; [print(json.loads(l)['text']) for l in sys.stdin if l.strip()]" \\
    < ../shared/data/spo/spo_0.json > /tmp/spo.txt
  spm_train --input=/tmp/spo.txt --model_prefix=/tmp/chatglm3-spm --vocab_size=8000 --model_type=unigram \\
    --character_coverage=0.9995 --byte_fallback=true --hard_vocab_limit=false --num_threads=2

which writes /tmp/chatglm3-spm.model (pass that as TOKENIZER_MODEL). No user-defined symbols are needed.

Usage: write_random_chatglm_ggml.py OUT.bin f16|q8_0|q4_0 TOKENIZER_MODEL [--layers N] [--arch chatglm|chatglm3]
  (TOKENIZER_MODEL: ChatGLM-6B's ice_text.model for chatglm, any SentencePiece model for chatglm3)
"""
import struct
import sys

import numpy as np

GGML_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q8_0": 8}
ALIGN = 16
CHUNK_BLOCKS = 1 << 20  # random blocks generated once, then cycled


def random_blocks(kind: str, rng: np.random.Generator) -> bytes:
    """One chunk of CHUNK_BLOCKS blocks of 32 weights in the GGML type's byte layout."""
    if kind == "f16":
        return (rng.standard_normal(CHUNK_BLOCKS * 32, dtype=np.float32) * 0.02).astype(np.float16).tobytes()
    if kind == "q8_0":
        d = np.full((CHUNK_BLOCKS, 1), 0.05 / 127, dtype=np.float16).view(np.uint8)      # max |w| ≈ 0.05
        qs = rng.integers(-127, 128, size=(CHUNK_BLOCKS, 32), dtype=np.int8).view(np.uint8)
        return np.concatenate([d.reshape(CHUNK_BLOCKS, 2), qs], axis=1).tobytes()
    if kind == "q4_0":
        d = np.full((CHUNK_BLOCKS, 1), 0.05 / 8, dtype=np.float16).view(np.uint8)
        qs = rng.integers(0, 256, size=(CHUNK_BLOCKS, 16), dtype=np.uint8)
        return np.concatenate([d.reshape(CHUNK_BLOCKS, 2), qs], axis=1).tobytes()
    raise ValueError(kind)


def bytes_per_block(kind: str) -> int:
    return {"f16": 64, "q8_0": 34, "q4_0": 18}[kind]


class Writer:
    def __init__(self, f, kind: str):
        self.f, self.kind = f, kind
        rng = np.random.default_rng(0)
        self.chunk = random_blocks(kind, rng)

    def header(self, name: str, shape, ggml_type: int):
        encoded = name.encode()
        self.f.write(struct.pack("i", len(encoded)))
        self.f.write(encoded)
        # convert.py writes the PyTorch shape ([out, in]) as is.
        self.f.write(struct.pack("i" * (2 + len(shape)), len(shape), *shape, ggml_type))
        pos = self.f.tell()
        self.f.seek((pos + ALIGN - 1) // ALIGN * ALIGN)

    def vector(self, name: str, n: int, value: float | None):
        self.header(name, (n,), GGML_TYPES["f32"])
        data = np.full(n, value, dtype=np.float32) if value is not None else \
            (np.random.default_rng(1).standard_normal(n, dtype=np.float32) * 0.02)
        self.f.write(data.tobytes())

    def matrix(self, name: str, rows: int, cols: int):
        assert cols % 32 == 0
        self.header(name, (rows, cols), GGML_TYPES[self.kind])
        remaining = rows * cols // 32 * bytes_per_block(self.kind)
        while remaining > 0:
            piece = self.chunk[: min(remaining, len(self.chunk))]
            self.f.write(piece)
            remaining -= len(piece)


CHATGLM3_VOCAB = 65024  # padded_vocab_size
CHATGLM3_SPECIAL_TOKENS = 9  # [MASK] [gMASK] [sMASK] sop eop <|system|> <|user|> <|assistant|> <|observation|>


def protobuf_fields(buf: bytes):
    """(field number, wire type, value) of each field of a serialized protobuf message: bytes for length-delimited
    fields, the integer for varints, the raw bytes for fixed-size ones."""
    pos = 0

    def varint():
        nonlocal pos
        value = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if byte < 0x80:
                return value

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            yield number, wire, varint()
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            yield number, wire, buf[pos:pos + size]
            pos += size
        elif wire == 2:
            size = varint()
            yield number, wire, buf[pos:pos + size]
            pos += size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def encode_varint(n: int) -> bytes:
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def pad_sentencepiece(proto: bytes, count: int) -> bytes:
    """The ModelProto with UNUSED pieces appended up to `count` pieces (ModelProto field 1 is the repeated
    SentencePiece {1: piece, 2: score, 3: type}; a repeated field may continue after the other fields)."""
    messages = [value for number, _, value in protobuf_fields(proto) if number == 1]
    pieces = {value for message in messages for number, _, value in protobuf_fields(message) if number == 1}
    present = len(messages)
    if present > count:
        sys.exit(f"the SentencePiece model has {present} pieces: at most {count} fit ChatGLM3's vocabulary")
    extra = bytearray()
    for i in range(present, count):
        name = f"<unused_{i}>".encode()
        if name in pieces:
            sys.exit(f"the SentencePiece model already has a piece {name.decode()}")
        piece = b"\x0a" + encode_varint(len(name)) + name + b"\x18\x05"  # piece, type UNUSED (5)
        extra += b"\x0a" + encode_varint(len(piece)) + piece
    return proto + bytes(extra)


def write_chatglm(f, kind: str, proto: bytes, layers: int):
    vocab, hidden, heads, inner, max_len = 130528, 4096, 32, 16384, 2048
    f.write(b"ggml")
    f.write(struct.pack("i", 1))  # ModelType.CHATGLM
    # config version 2: dtype, vocab, hidden, heads, kv heads, layers, inner, eps, pre_seq_len, rope theta,
    # max length, eos, pad (ChatGLM-6B's config.json)
    f.write(struct.pack("iiiiiiiififiii", 2, GGML_TYPES[kind], vocab, hidden, heads, heads, layers, inner,
                        1e-5, 0, 10000.0, max_len, 130005, 3))
    f.write(struct.pack("i", len(proto)))
    f.write(proto)
    w = Writer(f, kind)
    w.matrix("transformer.word_embeddings.weight", vocab, hidden)
    for i in range(layers):
        p = f"transformer.layers.{i}."
        w.vector(p + "input_layernorm.weight", hidden, 1.0)
        w.vector(p + "input_layernorm.bias", hidden, 0.0)
        w.matrix(p + "attention.query_key_value.weight", 3 * hidden, hidden)
        w.vector(p + "attention.query_key_value.bias", 3 * hidden, None)
        w.matrix(p + "attention.dense.weight", hidden, hidden)
        w.vector(p + "attention.dense.bias", hidden, None)
        w.vector(p + "post_attention_layernorm.weight", hidden, 1.0)
        w.vector(p + "post_attention_layernorm.bias", hidden, 0.0)
        w.matrix(p + "mlp.dense_h_to_4h.weight", inner, hidden)
        w.vector(p + "mlp.dense_h_to_4h.bias", inner, None)
        w.matrix(p + "mlp.dense_4h_to_h.weight", hidden, inner)
        w.vector(p + "mlp.dense_4h_to_h.bias", hidden, None)
        print(f"layer {i + 1}/{layers}", file=sys.stderr, end="\r")
    w.vector("transformer.final_layernorm.weight", hidden, 1.0)
    w.vector("transformer.final_layernorm.bias", hidden, 0.0)


def write_chatglm3(f, kind: str, proto: bytes, layers: int):
    """`proto` already padded by pad_sentencepiece."""
    vocab, hidden, heads, kv_groups, head_dim, inner, max_len = CHATGLM3_VOCAB, 4096, 32, 2, 128, 13696, 8192
    qkv = hidden + 2 * kv_groups * head_dim
    f.write(b"ggml")
    f.write(struct.pack("i", 3))  # ModelType.CHATGLM3
    # config version 2 as above, from ChatGLM3-6B's config.json: padded_vocab_size, hidden_size, num_attention_heads,
    # multi_query_group_num, num_layers, ffn_hidden_size, layernorm_epsilon, no prefix, 10000 * rope_ratio 1,
    # seq_length, eos_token_id, pad_token_id
    f.write(struct.pack("iiiiiiiififiii", 2, GGML_TYPES[kind], vocab, hidden, heads, kv_groups, layers, inner,
                        1e-5, 0, 10000.0, max_len, 2, 0))
    f.write(struct.pack("i", len(proto)))
    f.write(proto)
    w = Writer(f, kind)
    w.matrix("transformer.embedding.word_embeddings.weight", vocab, hidden)
    for i in range(layers):
        p = f"transformer.encoder.layers.{i}."
        w.vector(p + "input_layernorm.weight", hidden, 1.0)
        w.matrix(p + "self_attention.query_key_value.weight", qkv, hidden)
        w.vector(p + "self_attention.query_key_value.bias", qkv, None)
        w.matrix(p + "self_attention.dense.weight", hidden, hidden)
        w.vector(p + "post_attention_layernorm.weight", hidden, 1.0)
        w.matrix(p + "mlp.dense_h_to_4h.weight", 2 * inner, hidden)  # gate rows, then up rows
        w.matrix(p + "mlp.dense_4h_to_h.weight", hidden, inner)
        print(f"layer {i + 1}/{layers}", file=sys.stderr, end="\r")
    w.vector("transformer.encoder.final_layernorm.weight", hidden, 1.0)
    w.matrix("transformer.output_layer.weight", vocab, hidden)


def main():
    at = sys.argv.index("--arch") if "--arch" in sys.argv else -1
    arch = "chatglm" if at < 0 else sys.argv[at + 1] if at + 1 < len(sys.argv) else ""
    if len(sys.argv) < 4 or sys.argv[2] not in ("f16", "q8_0", "q4_0") or arch not in ("chatglm", "chatglm3"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out, kind, spm = sys.argv[1], sys.argv[2], sys.argv[3]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 28
    proto = open(spm, "rb").read()
    if arch == "chatglm3":
        proto = pad_sentencepiece(proto, CHATGLM3_VOCAB - CHATGLM3_SPECIAL_TOKENS)
    with open(out, "wb") as f:
        (write_chatglm3 if arch == "chatglm3" else write_chatglm)(f, kind, proto, layers)
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
