"""A PyTorch guided-diffusion UNet for parity tests (test-only; never imported by the package).

Written from the semantics of `guided_diffusion/unet.py` (NCHW, the same module
tree and therefore the same state-dict keys), so that options the reference
fixture does not cover (plain conv/avg-pool resampling, class conditioning,
the new attention order, num_heads, no scale-shift norm, per-level block
counts) are checked value for value through the converter.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ddcm_jax.models.adm import ADMConfig


class _GN(nn.GroupNorm):
    def forward(self, x):  # float32 statistics, cast back (GroupNorm32)
        return super().forward(x.float()).type(x.dtype)


def _gn(c: int) -> _GN:
    return _GN(32, c)


class _Seq(nn.Sequential):
    def forward(self, x, emb):
        for layer in self:
            x = layer(x, emb) if isinstance(layer, _Res) else layer(x)
        return x


class _Up(nn.Module):
    def __init__(self, c: int, use_conv: bool):
        super().__init__()
        self.use_conv = use_conv
        if use_conv:
            self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class _Down(nn.Module):
    def __init__(self, c: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2, 2)

    def forward(self, x):
        return self.op(x)


class _Res(nn.Module):
    def __init__(self, c, emb, out, ss, up=False, down=False):
        super().__init__()
        self.ss = ss
        self.in_layers = nn.Sequential(_gn(c), nn.SiLU(), nn.Conv2d(c, out, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = _Up(c, False), _Up(c, False)
        elif down:
            self.h_upd, self.x_upd = _Down(c, False), _Down(c, False)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, 2 * out if ss else out))
        self.out_layers = nn.Sequential(
            _gn(out), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out == c else nn.Conv2d(c, out, 1)

    def forward(self, x, emb):
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        e = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.ss:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = self.out_layers[1:](self.out_layers[0](h) * (1 + scale) + shift)
        else:
            h = self.out_layers(h + e)
        return self.skip_connection(x) + h


class _Attn(nn.Module):
    def __init__(self, c, heads, head_channels, new_order):
        super().__init__()
        self.heads = heads if head_channels == -1 else c // head_channels
        self.new_order = new_order
        self.norm = _gn(c)
        self.qkv = nn.Conv1d(c, 3 * c, 1)
        self.proj_out = nn.Conv1d(c, c, 1)

    def forward(self, x):
        b, c, *sp = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))
        n, length = self.heads, qkv.shape[-1]
        ch = c // n
        if self.new_order:
            q, k, v = (t.reshape(b * n, ch, length) for t in qkv.chunk(3, dim=1))
        else:
            q, k, v = qkv.reshape(b * n, 3 * ch, length).split(ch, dim=1)
        s = 1 / math.sqrt(math.sqrt(ch))
        w = torch.softmax(torch.einsum("bct,bcs->bts", q * s, k * s).float(), -1).type(q.dtype)
        a = torch.einsum("bts,bcs->bct", w, v).reshape(b, -1, length)
        return (x + self.proj_out(a)).reshape(b, c, *sp)


class TorchADM(nn.Module):
    def __init__(self, cfg: ADMConfig):
        super().__init__()
        mc, ted = cfg.model_channels, cfg.time_embed_dim
        self.mc, self.num_classes = mc, cfg.num_classes
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.num_classes is not None:
            self.label_emb = nn.Embedding(cfg.num_classes, ted)
        ss = cfg.use_scale_shift_norm

        def attn(c, heads):
            return _Attn(c, heads, cfg.num_head_channels, cfg.use_new_attention_order)

        ch = input_ch = int(cfg.channel_mult[0] * mc)
        self.input_blocks = nn.ModuleList([_Seq(nn.Conv2d(cfg.in_channels, ch, 3, padding=1))])
        chans, ds = [ch], 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks[level]):
                layers = [_Res(ch, ted, int(mult * mc), ss)]
                ch = int(mult * mc)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, cfg.num_heads))
                self.input_blocks.append(_Seq(*layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                down = _Res(ch, ted, ch, ss, down=True) if cfg.resblock_updown else _Down(ch, cfg.conv_resample)
                self.input_blocks.append(_Seq(down))
                chans.append(ch)
                ds *= 2
        self.middle_block = _Seq(_Res(ch, ted, ch, ss), attn(ch, cfg.num_heads), _Res(ch, ted, ch, ss))
        self.output_blocks = nn.ModuleList([])
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks[level] + 1):
                layers = [_Res(ch + chans.pop(), ted, int(mc * mult), ss)]
                ch = int(mc * mult)
                if ds in cfg.attention_ds:
                    layers.append(attn(ch, cfg.heads_upsample))
                if level and i == cfg.num_res_blocks[level]:
                    layers.append(_Res(ch, ted, ch, ss, up=True) if cfg.resblock_updown else _Up(ch, cfg.conv_resample))
                    ds //= 2
                self.output_blocks.append(_Seq(*layers))
        self.out = nn.Sequential(_gn(ch), nn.SiLU(), nn.Conv2d(input_ch, cfg.out_channels, 3, padding=1))

    def forward(self, x, t, y=None):
        half = self.mc // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=x.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        if self.mc % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], -1)
        emb = self.time_embed(emb)
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        hs, h = [], x
        for m in self.input_blocks:
            h = m(h, emb)
            hs.append(h)
        h = self.middle_block(h, emb)
        for m in self.output_blocks:
            h = m(torch.cat([h, hs.pop()], 1), emb)
        return self.out(h)


def random_torch_adm(cfg: ADMConfig, seed: int) -> TorchADM:
    """Every parameter random (incl. the layers the original zero-initialises)."""
    torch.manual_seed(seed)
    model = TorchADM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1 and not name.startswith("label_emb"):
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            elif p.ndim == 1 and name.endswith(".weight"):  # norm scales around 1
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model
