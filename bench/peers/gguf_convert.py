#!/usr/bin/env python3
# Converts a bench checkpoint (HF folder, bf16 safetensors: Mixtral-like or Qwen3-MoE-like) to GGUF
# for the llama.cpp peer, then quantizes it with llama.cpp's own quantizer (llama_model_quantize in
# the libllama.so that node-llama-cpp ships), so Q8_0 and Q4_K_M are made exactly as `llama-quantize`
# makes them. Writes <out>/model-BF16.gguf and <out>/model-<TYPE>.gguf for each requested type.
#
#   python gguf_convert.py HF_DIR OUT_DIR LIBLLAMA_SO Q8_0,Q4_K_M
#
# Needs torch (to read bf16 safetensors), numpy and the `gguf` package (pip install gguf). Tensor
# names and metadata follow llama.cpp's convert_hf_to_gguf.py for the two architectures: Mixtral is
# llama.cpp's "llama" arch with merged experts (q/k rows permuted from HF's rotate-half rotary to
# llama.cpp's interleaved one); Qwen3-MoE is "qwen3moe" (NEOX rotary, no permutation).
import ctypes
import json
import os
import sys

import numpy as np
import torch
from safetensors.torch import load_file

import gguf

FTYPES = {'Q8_0': 7, 'Q4_K_M': 15, 'Q4_K_S': 14, 'Q6_K': 18, 'BF16': 32}


def bf16_bits(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def permute_rope(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # HF rotates halves (x[:d/2], x[d/2:]); llama.cpp's "llama" arch rotates adjacent pairs.
    rows, cols = w.shape
    return w.reshape(n_head, 2, rows // n_head // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def load_tensors(hf_dir: str) -> dict:
    out = {}
    for f in sorted(os.listdir(hf_dir)):
        if f.endswith('.safetensors'):
            out.update(load_file(os.path.join(hf_dir, f)))
    return out


def add_vocab(w: gguf.GGUFWriter, hf_dir: str, vocab_size: int, cfg: dict) -> None:
    tok = json.load(open(os.path.join(hf_dir, 'tokenizer.json')))
    vocab = tok['model']['vocab']
    tokens = [f'<unused{i}>' for i in range(vocab_size)]
    for s, i in vocab.items():
        if i < vocab_size:
            tokens[i] = s
    special = {a['id'] for a in tok.get('added_tokens', []) if a.get('special')}
    types = []
    for i, s in enumerate(tokens):
        if i == 0:
            types.append(gguf.TokenType.UNKNOWN)
        elif i in special:
            types.append(gguf.TokenType.CONTROL)
        elif s.startswith('<0x') and s.endswith('>') and len(s) == 6:
            types.append(gguf.TokenType.BYTE)
        else:
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model('llama')
    w.add_token_list(tokens)
    w.add_token_scores([-float(i) for i in range(vocab_size)])
    w.add_token_types(types)
    w.add_bos_token_id(cfg.get('bos_token_id', 1))
    w.add_eos_token_id(cfg.get('eos_token_id', 2))
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)


def convert(hf_dir: str, out_path: str) -> None:
    cfg = json.load(open(os.path.join(hf_dir, 'config.json')))
    mt = cfg['model_type']
    arch = {'mixtral': 'llama', 'qwen3_moe': 'qwen3moe'}.get(mt)
    if arch is None:
        raise SystemExit(f'gguf_convert: model_type {mt!r} is not supported (mixtral, qwen3_moe)')
    H, L = cfg['hidden_size'], cfg['num_hidden_layers']
    nh, nkv = cfg['num_attention_heads'], cfg['num_key_value_heads']
    hd = cfg.get('head_dim') or H // nh
    E = cfg['num_local_experts'] if mt == 'mixtral' else cfg['num_experts']
    topk = cfg['num_experts_per_tok']
    I = cfg['intermediate_size'] if mt == 'mixtral' else cfg['moe_intermediate_size']
    st = load_tensors(hf_dir)

    w = gguf.GGUFWriter(out_path, arch)
    w.add_name(os.path.basename(os.path.normpath(hf_dir)))
    w.add_context_length(cfg.get('max_position_embeddings', 4096))
    w.add_embedding_length(H)
    w.add_block_count(L)
    w.add_feed_forward_length(cfg['intermediate_size'])
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_rope_freq_base(float(cfg.get('rope_theta', 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg['rms_norm_eps']))
    w.add_expert_count(E)
    w.add_expert_used_count(topk)
    if arch == 'qwen3moe':
        w.add_expert_feed_forward_length(I)
    w.add_vocab_size(cfg['vocab_size'])
    w.add_file_type(FTYPES['BF16'])
    add_vocab(w, hf_dir, cfg['vocab_size'], cfg)

    def put(name: str, t: torch.Tensor) -> None:
        t = t.to(torch.float32)
        if t.ndim == 1:  # norms stay f32, as the converter keeps them
            w.add_tensor(name, t.numpy())
        else:
            w.add_tensor(name, bf16_bits(t), raw_dtype=gguf.GGMLQuantizationType.BF16)

    put('token_embd.weight', st['model.embed_tokens.weight'])
    put('output_norm.weight', st['model.norm.weight'])
    put('output.weight', st['lm_head.weight'] if 'lm_head.weight' in st else st['model.embed_tokens.weight'])
    for l in range(L):
        p = f'model.layers.{l}.'
        q, k = st[p + 'self_attn.q_proj.weight'], st[p + 'self_attn.k_proj.weight']
        if arch == 'llama':
            q, k = permute_rope(q, nh), permute_rope(k, nkv)
        put(f'blk.{l}.attn_norm.weight', st[p + 'input_layernorm.weight'])
        put(f'blk.{l}.ffn_norm.weight', st[p + 'post_attention_layernorm.weight'])
        put(f'blk.{l}.attn_q.weight', q)
        put(f'blk.{l}.attn_k.weight', k)
        put(f'blk.{l}.attn_v.weight', st[p + 'self_attn.v_proj.weight'])
        put(f'blk.{l}.attn_output.weight', st[p + 'self_attn.o_proj.weight'])
        if arch == 'qwen3moe':
            put(f'blk.{l}.attn_q_norm.weight', st[p + 'self_attn.q_norm.weight'])
            put(f'blk.{l}.attn_k_norm.weight', st[p + 'self_attn.k_norm.weight'])
        if mt == 'mixtral':
            m = p + 'block_sparse_moe.'
            put(f'blk.{l}.ffn_gate_inp.weight', st[m + 'gate.weight'])
            names = ('w1', 'w3', 'w2')
            ex = lambda e, n: st[f'{m}experts.{e}.{n}.weight']  # noqa: E731
        else:
            m = p + 'mlp.'
            put(f'blk.{l}.ffn_gate_inp.weight', st[m + 'gate.weight'])
            names = ('gate_proj', 'up_proj', 'down_proj')
            ex = lambda e, n: st[f'{m}experts.{e}.{n}.weight']  # noqa: E731
        for g, n in zip(('ffn_gate_exps', 'ffn_up_exps', 'ffn_down_exps'), names):
            put(f'blk.{l}.{g}.weight', torch.stack([ex(e, n) for e in range(E)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


class QuantizeParams(ctypes.Structure):
    # llama_model_quantize_params begins with int32 nthread and enum llama_ftype ftype; the rest is
    # kept as the library's defaults. Declared larger than the real struct: it is returned by value
    # through a hidden pointer (System V, over 16 bytes), so the callee writes only its real size.
    _fields_ = [('nthread', ctypes.c_int32), ('ftype', ctypes.c_int32), ('rest', ctypes.c_uint8 * 504)]


def quantize(lib_path: str, src: str, dst: str, ftype: int, threads: int) -> None:
    lib = ctypes.CDLL(lib_path)
    if hasattr(lib, 'llama_backend_init'):
        lib.llama_backend_init.restype = None
        lib.llama_backend_init()
    lib.llama_model_quantize_default_params.restype = QuantizeParams
    lib.llama_model_quantize_default_params.argtypes = []
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    lib.llama_model_quantize.restype = ctypes.c_uint32
    lib.llama_model_quantize.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.POINTER(QuantizeParams)]
    rc = lib.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f'llama_model_quantize({src} -> {dst}, ftype {ftype}) returned {rc}')


def main() -> None:
    hf_dir, out_dir, lib, types = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split(',')
    threads = int(sys.argv[5]) if len(sys.argv) > 5 else os.cpu_count() or 1
    os.makedirs(out_dir, exist_ok=True)
    base = os.path.join(out_dir, 'model-BF16.gguf')
    if not os.path.exists(base):
        convert(hf_dir, base + '.tmp')
        os.replace(base + '.tmp', base)
    for t in types:
        if t == 'BF16':
            continue
        if t not in FTYPES:
            raise SystemExit(f'gguf_convert: type {t!r} is not one of {", ".join(FTYPES)}')
        dst = os.path.join(out_dir, f'model-{t}.gguf')
        if not os.path.exists(dst):
            quantize(lib, base, dst + '.tmp', FTYPES[t], threads)
            os.replace(dst + '.tmp', dst)
    print(json.dumps({'ok': True, 'files': sorted(os.listdir(out_dir))}))


if __name__ == '__main__':
    main()
