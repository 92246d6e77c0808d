"""PyTorch's time for the operations of `ragar bench ops`, by the same names and shapes.

SD1.5's UNet and VAE operations in f16 on the GPU: 3×3 convolutions and the matrix products of the
same size, the NHWC→NCHW copy, group norm, self attention at the 64×64 level (fused projection,
scaled_dot_product_attention as diffusers uses it, output projection), SiLU, a broadcast add, the
channel concatenation and the nearest 2× upsample. Each runs `reps` times after two warm-ups,
synchronized before and after; prints one JSON line {"torch", "gpu", "batch", "ops": [{"name",
"ms"}]} and writes it to $OPS_OUT/ops_anchor.json when OPS_OUT is set.

    python3 deploy/gpu/ops_anchor.py [BATCH] [REPS]
"""
import json, os, sys, time
import torch
import torch.nn.functional as F

batch = int(sys.argv[1]) if len(sys.argv) > 1 else 1
reps = int(sys.argv[2]) if len(sys.argv) > 2 else 20
dev, dt = "cuda", torch.float16
torch.backends.cuda.matmul.allow_tf32 = True
torch.backends.cudnn.allow_tf32 = True
unet_b, vae_b = 2 * batch, batch
ops = []


def rnd(*shape):
    return torch.randn(*shape, device=dev, dtype=dt)


for part, b, c, side in [("unet", unet_b, 320, 64), ("unet", unet_b, 640, 32), ("unet", unet_b, 1280, 16),
                         ("vae", vae_b, 512, 64), ("vae", vae_b, 512, 128), ("vae", vae_b, 256, 256),
                         ("vae", vae_b, 128, 512)]:
    x, w = rnd(b, c, side, side), rnd(c, c, 3, 3)
    ops.append((f"{part}.conv3x3.{c}ch.{side}px", lambda x=x, w=w: F.conv2d(x, w, padding=1)))
    a, w2 = rnd(b * side * side, 9 * c), rnd(c, 9 * c)
    ops.append((f"{part}.gemm_of_conv3x3.{c}ch.{side}px", lambda a=a, w2=w2: a @ w2.t()))

x = rnd(unet_b, 64, 64, 320)
ops.append(("unet.nhwc_to_nchw.320ch.64px", lambda x=x: x.permute(0, 3, 1, 2).contiguous()))

for part, b, c, side in [("unet", unet_b, 320, 64), ("vae", vae_b, 128, 512)]:
    x = rnd(b, c, side, side)
    gw, gb = torch.ones(c, device=dev, dtype=dt), torch.zeros(c, device=dev, dtype=dt)
    ops.append((f"{part}.group_norm.ragar.{c}ch.{side}px",
                lambda x=x, gw=gw, gb=gb: F.group_norm(x, 32, gw, gb, 1e-5)))

tokens, c, heads = 4096, 320, 8
xa = rnd(unet_b, tokens, c)
wqkv, wo, bo = rnd(3 * c, c) * 0.05, rnd(c, c) * 0.05, rnd(c)


def attention(x=xa):
    b, l, _ = x.shape
    q, k, v = (x @ wqkv.t()).view(b, l, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    o = F.scaled_dot_product_attention(q, k, v)
    return o.transpose(1, 2).reshape(b, l, c) @ wo.t() + bo


ops.append((f"unet.self_attention.ragar.{tokens}tok.{c}ch", attention))

x, t, skip = rnd(unet_b, 320, 64, 64), rnd(unet_b, 320, 1, 1), rnd(unet_b, 320, 64, 64)
ops.append(("unet.silu.320ch.64px", lambda: F.silu(x)))
ops.append(("unet.broadcast_add.320ch.64px", lambda: x + t))
ops.append(("unet.cat_channels.640ch.64px", lambda: torch.cat([x, skip], 1)))
low = rnd(unet_b, 1280, 16, 16)
ops.append(("unet.upsample_nearest2x.1280ch.16px", lambda: F.interpolate(low, scale_factor=2.0, mode="nearest")))

rows = []
with torch.inference_mode():
    for name, fn in ops:
        fn(); fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
        rows.append({"name": name, "ms": (time.perf_counter() - t0) / reps * 1e3})

out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0), "batch": batch, "ops": rows}
print(json.dumps(out), flush=True)
if os.environ.get("OPS_OUT"):
    with open(os.path.join(os.environ["OPS_OUT"], "ops_anchor.json"), "w") as f:
        json.dump(out, f, indent=1)
