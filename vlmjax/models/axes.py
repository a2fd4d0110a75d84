"""Logical axis names of activations, in one place so model code never misspells them.

Parameters use "vocab", "embed", "q_heads", "kv_heads", "head_dim", "mlp", "norm" and, for layers
stacked by ``nn.scan``, "layers"; ``vlmjax/sharding.py`` maps every name to mesh axes.
"""

ACT_BATCH = "act_batch"
ACT_LEN = "act_len"
ACT_EMBED = "act_embed"
ACT_HEADS = "act_heads"
ACT_KV_HEADS = "act_kv_heads"
ACT_HEAD_DIM = "act_head_dim"
ACT_MLP = "act_mlp"
ACT_VOCAB = "act_vocab"
# The stacked-layer axis of scanned params (``model.scan_layers``).
LAYERS = "layers"
