"""One-shot GPU check (run on a machine with CUDA and PyTorch >= 2.5; writes into $OUT or ./out):

A. libtorch's CUDA weight-only kernels on MinLora's stored layouts, against a float64 dequantized reference:
   - Int8PerRow:        int8 [N,K] + float16 scale [N]      -> torch._weight_int8pack_mm (scale cast to bf16)
   - Int4Grouped:       uint8 [N,K/2], even column high nibble, u in 0..15, bf16 scale/zero [N,K/g]
                        -> torch._convert_weight_to_int4pack(packed, 8) + torch._weight_int4pack_mm
   - Int4PerRowChatGlm: int8 [N,K/2] signed nibbles q in -7..7, float16 row scale -> u = q + 8, zero = 0
   plus timings (CUDA events, medians) against bf16 linear.
B. A PEFT LoRA adapter made by Hugging Face PEFT itself for a tiny model whose state-dict keys match the
   MinLora test model ToyNet (emb, fc1, fc2), with inputs and outputs, so the .NET tests can check that
   LoadLoraAdapter reproduces PEFT's numbers.

The quantization formulas below restate MinLora's documented formats (QuantizationFormat.cs) independently.
"""
import json
import os
import statistics
import sys
import traceback

import torch

OUT = os.environ.get("OUT", "out")
os.makedirs(OUT, exist_ok=True)
report = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": None, "kernels": [], "timings": [], "peft": None}


def log(*a):
    print(*a, flush=True)


def quant_int8(w):
    scale = (w.abs().amax(1) / 127).clamp_min(1e-12).half().clamp_min(6e-8)
    q = torch.round(w / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def pack_unsigned(u):  # u int [N,K] in 0..15 -> uint8 [N,K/2], even column in the high nibble
    u = u.to(torch.int32)
    return ((u[:, 0::2] << 4) | u[:, 1::2]).to(torch.uint8)


def pack_signed(q):  # q in -8..7 -> int8 [N,K/2] (ChatGLM)
    q = q.to(torch.int32)
    b = (q[:, 0::2] << 4) | (q[:, 1::2] & 0xF)
    b = b & 0xFF
    return torch.where(b >= 128, b - 256, b).to(torch.int8)


def unpack_signed(p):
    b = p.to(torch.int32)
    hi = b >> 4
    lo = ((b & 0xF) ^ 8) - 8
    return torch.stack([hi, lo], 2).reshape(p.shape[0], p.shape[1] * 2)


def quant_int4_grouped(w, g):
    n, k = w.shape
    x = w.reshape(n, k // g, g)
    mn, mx = x.amin(2), x.amax(2)
    zero = (mn + (mx - mn) * 8 / 15).bfloat16()
    z = zero.float()
    need = torch.maximum((mx - z) / 7, (z - mn) / 8).clamp_min(1e-12)
    scale = (need * (1 + 1 / 128)).bfloat16()
    s = scale.float()
    u = (torch.round((x - z[..., None]) / s[..., None]) + 8).clamp(0, 15).reshape(n, k)
    return u, scale, zero


def deq_grouped(u, scale, zero, g):
    n, k = u.shape
    return ((u.double().reshape(n, k // g, g) - 8) * scale.double()[..., None] + zero.double()[..., None]).reshape(n, k)


def check(name, fast, ref):
    err = (fast.double() - ref).abs().max().item()
    mag = ref.abs().max().item()
    ok = err <= 0.01 * mag
    report["kernels"].append({"case": name, "max_err": err, "max_abs_ref": mag, "ok": ok})
    log(f"{'OK ' if ok else 'BAD'} {name}: max err {err:.4g} (|ref| {mag:.4g})")


def time_ms(fn, reps=50):
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); fn(); b.record(); torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    return statistics.median(ts)


def part_a():
    dev = "cuda"
    report["device"] = torch.cuda.get_device_name(0)
    torch.manual_seed(0)
    shapes = [(4096, 4096), (12288, 4096), (4096, 16384), (64, 256), (37, 64)]
    for n, k in shapes:
        w = torch.randn(n, k, device=dev) * 0.02
        x = torch.randn(3, k, device=dev).bfloat16()
        # int8
        try:
            q, s = quant_int8(w)
            y = torch._weight_int8pack_mm(x, q, s.bfloat16())
            ref = x.double() @ (q.double() * s.double()[:, None]).t()
            check(f"int8 {n}x{k}", y, ref)
        except Exception as e:
            report["kernels"].append({"case": f"int8 {n}x{k}", "error": str(e).splitlines()[0]}); log("ERR int8", n, k, e)
        # int4 grouped and ChatGLM per-row
        for g in ([32, 64, 128, 256] if (n, k) == (4096, 4096) else [128]):
            if k % g or k % 128 or n % 8:
                continue
            try:
                u, sc, ze = quant_int4_grouped(w, g)
                packed = torch._convert_weight_to_int4pack(pack_unsigned(u), 8)
                sz = torch.stack([sc.t(), ze.t()], 2).contiguous()
                y = torch._weight_int4pack_mm(x, packed, g, sz)
                check(f"int4 grouped g{g} {n}x{k}", y, x.double() @ deq_grouped(u, sc, ze, g).t())
            except Exception as e:
                report["kernels"].append({"case": f"int4 g{g} {n}x{k}", "error": str(e).splitlines()[0]}); log("ERR int4", n, k, g, e)
        if k % 128 == 0 and n % 8 == 0:
            try:
                s4 = (w.abs().amax(1) / 7).clamp_min(1e-12).half()
                q4 = torch.round(w / s4.float()[:, None]).clamp(-7, 7)
                stored = pack_signed(q4)                       # what a chatglm-6b-int4 checkpoint holds
                u = unpack_signed(stored) + 8                  # MinLora's mapping: u = q + 8, zero = 0
                g = 128
                sc = s4.bfloat16()[None, :].expand(k // g, n)
                sz = torch.stack([sc, torch.zeros_like(sc)], 2).contiguous()
                packed = torch._convert_weight_to_int4pack(pack_unsigned(u), 8)
                y = torch._weight_int4pack_mm(x, packed, g, sz)
                ref = x.double() @ (unpack_signed(stored).double() * s4.double()[:, None]).t()
                check(f"int4 chatglm per-row {n}x{k}", y, ref)
            except Exception as e:
                report["kernels"].append({"case": f"int4 chatglm {n}x{k}", "error": str(e).splitlines()[0]}); log("ERR chatglm", n, k, e)

    # Timings: ratio = bf16 linear time / path time (higher is faster), weights beyond L2 (50 MB) by cycling copies.
    for n, k in [(4096, 4096), (12288, 4096), (16384, 4096), (4096, 16384)]:
        copies = 4
        ws = [torch.randn(n, k, device=dev).bfloat16() for _ in range(copies)]
        q8 = [quant_int8(w.float()) for w in ws]
        q4 = []
        for w in ws:
            u, sc, ze = quant_int4_grouped(w.float(), 128)
            q4.append((torch._convert_weight_to_int4pack(pack_unsigned(u), 8), torch.stack([sc.t(), ze.t()], 2).contiguous()))
        q8b = [(q, s.bfloat16()) for q, s in q8]
        for rows in [1, 16, 128]:
            x = torch.randn(rows, k, device=dev).bfloat16()
            i = [0]
            def lin():
                i[0] += 1; return torch.nn.functional.linear(x, ws[i[0] % copies])
            def i8():
                i[0] += 1; q, s = q8b[i[0] % copies]; return torch._weight_int8pack_mm(x, q, s)
            def i4():
                i[0] += 1; p, sz = q4[i[0] % copies]; return torch._weight_int4pack_mm(x, p, 128, sz)
            t = {name: time_ms(f) for name, f in [("bf16_linear", lin), ("int8pack", i8), ("int4pack_g128", i4)]}
            row = {"shape": f"{k}->{n}", "rows": rows, **{f"{kk}_ms": v for kk, v in t.items()},
                   "int8_ratio": t["bf16_linear"] / t["int8pack"], "int4_ratio": t["bf16_linear"] / t["int4pack_g128"]}
            report["timings"].append(row)
            log(row)


def part_b():
    import safetensors.torch as st
    import peft
    from peft import LoraConfig, get_peft_model

    class Toy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(50, 16)
            self.fc1 = torch.nn.Linear(16, 24)
            self.act = torch.nn.Tanh()
            self.fc2 = torch.nn.Linear(24, 8)

        def forward(self, ids):
            return self.fc2(self.act(self.fc1(self.emb(ids))))

    torch.manual_seed(0)
    base = Toy().eval()
    base_sd = {k: v.detach().clone().contiguous() for k, v in base.state_dict().items()}
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["emb", "fc1", "fc2"], init_lora_weights=False)
    model = get_peft_model(base, cfg).eval()
    ids = torch.randint(0, 50, (3, 5))
    with torch.no_grad():
        out = model(ids)
        with model.disable_adapter():
            base_out = model(ids)
    adapter_dir = os.path.join(OUT, "peft_adapter")
    model.save_pretrained(adapter_dir)
    merged = model.merge_and_unload()
    with torch.no_grad():
        merged_out = merged(ids)
    st.save_file(base_sd, os.path.join(OUT, "peft_base.safetensors"))
    st.save_file({"ids": ids.contiguous(), "adapted": out.contiguous(), "base": base_out.contiguous(), "merged": merged_out.contiguous()},
                 os.path.join(OUT, "peft_io.safetensors"))
    report["peft"] = {"version": peft.__version__, "adapter_files": sorted(os.listdir(adapter_dir)),
                      "max_abs_adapted_minus_base": (out - base_out).abs().max().item()}
    log("peft", report["peft"])


for part in (part_a, part_b):
    try:
        part()
    except Exception:
        traceback.print_exc()
        report.setdefault("errors", []).append(traceback.format_exc().splitlines()[-1])

with open(os.path.join(OUT, "report.json"), "w") as f:
    json.dump(report, f, indent=1)
log("done")
sys.exit(0)
