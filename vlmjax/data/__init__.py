"""Input pipelines (grain): document sources, tokenizers, LM packing.

Everything runs offline: the default source is an English corpus embedded in
CPython (see `corpus`), and real data (text/JSONL files, TFDS ArrayRecord
directories) is named in the config.
"""

from vlmjax.data.lm import build_lm_data
from vlmjax.data.lm import default_config
from vlmjax.data.lm import LMData

__all__ = ["LMData", "build_lm_data", "default_config"]
