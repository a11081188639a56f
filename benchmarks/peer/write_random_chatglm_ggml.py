#!/usr/bin/env python3
"""Writes a ChatGLM-6B model with random weights in chatglm.cpp's GGML file format (model type 1, config version 2).

chatglm.cpp loads only files made by its convert.py from a Hugging Face checkpoint, and no checkpoint can be downloaded
here, so this writes the same layout directly: magic, model type, config, the SentencePiece model proto, then every
tensor (name, shape, GGML type, data aligned to 16 bytes) in convert.py's order. The 2-D weights (the embedding, tied
to the head, and the four projections of each block) are in the requested type: f16, q8_0 (f16 scale + 32 int8 per
block) or q4_0 (f16 scale + 16 bytes of nibbles). Values are random and of a trained model's size (about N(0, 0.02));
a chunk of random blocks is written repeatedly, which does not matter for timing (the model is far beyond any cache).

Usage: write_random_chatglm_ggml.py OUT.bin f16|q8_0|q4_0 ICE_TEXT_MODEL [--layers N]
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


def main():
    if len(sys.argv) < 4 or sys.argv[2] not in ("f16", "q8_0", "q4_0"):
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    out, kind, spm = sys.argv[1], sys.argv[2], sys.argv[3]
    layers = int(sys.argv[sys.argv.index("--layers") + 1]) if "--layers" in sys.argv else 28
    vocab, hidden, heads, inner, max_len = 130528, 4096, 32, 16384, 2048
    proto = open(spm, "rb").read()
    with open(out, "wb") as f:
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
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
