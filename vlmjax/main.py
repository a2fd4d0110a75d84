"""Entry point: ``python -m vlmjax.main --config=configs/lm.py --workdir=DIR [--config.a.b=value]``.

Kept short on purpose (flax ``examples/imagenet/main.py``): flags, optional ``jax.distributed``
initialisation, then the importable ``vlmjax.train.run(config, workdir)``.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from vlmjax import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/lm.py or configs/lm.py:smoke.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics.jsonl and config.json; a "
                    "run resumes from its latest checkpoint.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    config = FLAGS.config
    distributed.maybe_initialize(config.distributed)
    from vlmjax import train  # after jax.distributed: nothing may touch devices before it

    logging.set_verbosity(logging.WARNING)
    train.run(config, FLAGS.workdir)


if __name__ == "__main__":
    app.run(main)
