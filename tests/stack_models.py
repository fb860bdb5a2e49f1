"""Tiny random multi-stack models (encoder-decoders, dual towers, VLMs) built from configs."""

from __future__ import annotations

import torch

# Dual towers: 5x5 patches of a 10-pixel image (+1 CLS for CLIP), three layers each.
TOWER_TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  max_position_embeddings=32)
TOWER_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, image_size=10,
                    patch_size=2)


def make_bart():
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(0)
    cfg = BartConfig(vocab_size=64, d_model=32, encoder_layers=3, decoder_layers=3, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
                     pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None)
    return BartForConditionalGeneration(cfg).eval()


def make_t5():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=3, num_decoder_layers=3, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg).eval()


def make_whisper():
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=64, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=3,
                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                        max_source_positions=8, max_target_positions=32, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=1, begin_suppress_tokens=None, suppress_tokens=None)
    return WhisperForConditionalGeneration(cfg).eval()


def make_clip():
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    return CLIPModel(CLIPConfig(text_config=TOWER_TEXT, vision_config=TOWER_VISION, projection_dim=16)).eval()


def make_siglip():
    from transformers import SiglipConfig, SiglipModel

    torch.manual_seed(0)
    return SiglipModel(SiglipConfig(text_config=TOWER_TEXT, vision_config=TOWER_VISION)).eval()


def make_llava():
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, image_size=8, patch_size=2)
    text = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0)
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_id=63, projector_hidden_act="gelu",
                      vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def make_paligemma():
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(0)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, image_size=8, patch_size=2, projection_dim=32)
    text = dict(model_type="gemma", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=0)
    cfg = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=63, projection_dim=32)
    return PaliGemmaForConditionalGeneration(cfg).eval()


def make_qwen2_vl():
    """A VLM whose vision tower does not export (data-dependent splits): traced stack by stack."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=160, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256,
                rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    vision = dict(depth=2, embed_dim=32, hidden_size=32, num_heads=4, mlp_ratio=2, patch_size=2,
                  spatial_merge_size=1, temporal_patch_size=1, in_chans=3)
    cfg = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=150, video_token_id=151,
                        vision_start_token_id=152)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def qwen2_vl_inputs(text_len: int = 5, seed: int = 0) -> dict:
    """One 8x8 image (16 patches of 2x2, one token each) and a short text, as its processor lays them out."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.cat([torch.tensor([[152]]), torch.full((1, 16), 150), torch.randint(0, 100, (1, text_len), generator=g)], 1)
    return dict(input_ids=ids, pixel_values=torch.randn(16, 12, generator=g), image_grid_thw=torch.tensor([[1, 4, 4]]),
                mm_token_type_ids=(ids == 150).long())
