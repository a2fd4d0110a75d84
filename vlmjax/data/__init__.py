"""Input pipelines (grain): document sources, tokenizers, LM packing, procedural video, image-text.

Everything runs offline: the default source is an English corpus embedded in
CPython (see `corpus`), and real data (text/JSONL files, TFDS ArrayRecord
directories) is named in the config.

Modules (each imports only those listed after it; no circles):

  common            seeds, batch layout, the sharded grain train head, TFDS I/O
  clips             the clip format, change maps, frame grouping, frame sampling
  tfds_text         TFDS text: read (TfdsTextSource) and write      <- common
  corpus            document sources (embedded, text, jsonl, tfds)  <- tfds_text
  tokenizers        bytes / BPE / HF tokenizers                     <- corpus
  lm                LM config and pipeline       <- common, corpus, tfds_text, tokenizers
  procedural_video  the numpy clip renderer                         <- clips
  video_files       a folder of videos as clips                     <- clips
  tfds_video        TFDS video: read and write                      <- clips, common
  video             video config and pipeline    <- clips, common, procedural_video,
                                                    video_files, tfds_video
  image_processing  CLIP-style image preprocessing (standalone)
  scenes            procedural scenes of shapes: render, captions, QA (standalone)
  image_text        image-caption config and pipeline <- clips, common, image_processing,
                                                         scenes, tokenizers
  vlm_data          captioning + VQA config and pipeline <- common, image_text, scenes,
                                                            tokenizers
"""

from vlmjax.data import image_text
from vlmjax.data.image_text import build_image_text_data
from vlmjax.data.image_text import ImageTextData
from vlmjax.data.lm import build_lm_data
from vlmjax.data.lm import default_config
from vlmjax.data.lm import LMData
from vlmjax.data import video
from vlmjax.data.video import build_video_data
from vlmjax.data.video import VideoData
from vlmjax.data import vlm_data
from vlmjax.data.vlm_data import build_vlm_data
from vlmjax.data.vlm_data import VLMData

__all__ = ["ImageTextData", "LMData", "VLMData", "VideoData", "build_image_text_data",
           "build_lm_data", "build_video_data", "build_vlm_data", "default_config", "image_text",
           "video", "vlm_data"]
