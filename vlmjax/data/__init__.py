"""Input pipelines (grain): document sources, tokenizers, LM packing, procedural video.

Everything runs offline: the default source is an English corpus embedded in
CPython (see `corpus`), and real data (text/JSONL files, TFDS ArrayRecord
directories) is named in the config.
"""

from vlmjax.data.lm import build_lm_data
from vlmjax.data.lm import default_config
from vlmjax.data.lm import LMData
from vlmjax.data import video
from vlmjax.data.video import build_video_data
from vlmjax.data.video import VideoData

__all__ = ["LMData", "VideoData", "build_lm_data", "build_video_data", "default_config", "video"]
