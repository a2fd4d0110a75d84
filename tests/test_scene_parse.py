"""Scene parsing (task 'scene_parse', vlmjax.data.scene_parse): random colours never come near the
palette, per-cell targets agree with the rendered pixels, tokens map to their cells, the smoke
experiment trains and reports shape accuracy on held-out pairs, and the VLM starts its tower from it."""

import os

import numpy as np
import pytest
from conftest import load_config

from vlmjax import run as runner
from vlmjax import tasks
from vlmjax import tree
from vlmjax.data import scene_parse, scenes
from vlmjax.tasks.scene_parse import cell_of_token

CFG = scenes.default_config()


def test_random_colours_stay_away_from_the_palette_and_background():
    palette = np.asarray(list(scenes.PALETTE.values()))
    for i in range(200):
        scene = scenes.sample_scene(0, i, "train", CFG)
        rgb = scenes.random_colours(scene, np.random.default_rng(i), 64)
        assert len(rgb) == len(scene.objects)
        for c in rgb:
            assert np.abs(palette - np.asarray(c)).max(1).min() >= 64
            assert np.abs(np.asarray(scene.background) - np.asarray(c)).max() >= 64
    with pytest.raises(ValueError, match="min_distance=250"):
        scenes.random_colours(scenes.sample_scene(0, 0, "train", CFG), np.random.default_rng(0), 250)


def test_records_paint_what_the_targets_say():
    cfg = scene_parse.default_config()
    train = scene_parse.SceneParseRecords(cfg, "train")
    for i in range(20):
        rec = train[i]
        scene = scenes.sample_scene(CFG.seed, i, "train", CFG)
        image, s = rec["image"], cfg.image_size
        assert image.shape == (s, s, 3) and image.dtype == np.uint8
        assert (rec["shape"] > 0).sum() == len(scene.objects)
        for obj in scene.objects:
            assert rec["shape"][obj.cell] == 1 + list(CFG.shapes).index(obj.shape)
            assert rec["size"][obj.cell] == 1 + scenes.SIZES.index(obj.size)
            # The object's centre pixel has exactly the target colour, never a palette colour.
            px = image[int(obj.cy * s), int(obj.cx * s)]
            np.testing.assert_allclose(px / 255.0, rec["rgb"][obj.cell], atol=1e-6)
            assert tuple(px) not in scenes.PALETTE.values()
            assert rec["colour"][obj.cell] == 0
        assert (train[i]["image"] == image).all()  # a record is a function of its index
    ev = scene_parse.SceneParseRecords(cfg, "eval")[0]
    assert ev["held_out"].sum() >= 1  # every eval scene holds a held-out pair, in palette colours
    cells = np.nonzero(ev["shape"])[0]
    assert all(ev["colour"][c] > 0 for c in cells)


def test_cell_of_token():
    np.testing.assert_array_equal(cell_of_token(3), np.arange(9))
    six = cell_of_token(6).reshape(6, 6)
    assert six[0, 0] == six[1, 1] == 0 and six[0, 2] == 1 and six[5, 5] == 8 and six[2, 0] == 3


def test_smoke_trains_and_the_vlm_starts_its_tower_from_it(tmp_path):
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    from vlmjax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    s = runner.run(load_config("scene_parse", "smoke"), str(tmp_path / "parse"))
    assert s["finished"]
    for key in ("shape_acc", "shape_acc_held_out", "shape_acc_seen", "size_acc", "colour_acc", "cell_acc"):
        assert 0.0 <= s["eval_end"][key] <= 1.0
    assert s["eval_end"]["objects"] > 0
    # The VLM smoke config's vision stage has this experiment's shapes: its tower starts from the run.
    vlm = load_config("trm_vlm_qa", "smoke", stages={})
    stage = load_config("scene_parse", "smoke", **{"model.tower": vlm.vision_encoder.tower.to_dict(),
                                                    "data.image_size": vlm.data.image_size})
    vision_dir = str(tmp_path / "vision")
    assert runner.run(stage, vision_dir)["finished"]
    saved = tree.flatten(checkpoint_lib.load_params(vision_dir)[0])
    task = tasks.build(vlm, None, {"vision": vision_dir})
    tr = Trainer(vlm, task, shd.make_mesh(vlm.mesh))
    got = tree.flatten(task.pretrained_params(tr.abstract_state.params, tr.state_shardings.params))
    assert {k.split("/")[0] for k in got} == {"vision_tower", "vision_token_norm"}
    for k, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), saved[k])
    # The VLM freezes the stage's tower (vision_encoder.freeze=('',)).
    assert any(f.startswith("^vision_tower/") for f in task.optimizer_config(vlm.optim).frozen)


def test_a_grid_the_cells_do_not_divide_is_one_error():
    cfg = load_config("scene_parse", "smoke", **{"model.tower.image_size": 32, "data.image_size": 32})
    with pytest.raises(ValueError, match="3x3 cells need a grid that 3 divides"):
        tasks.build(cfg, None)


def test_resampler_stage_feeds_the_vlms_perceiver_and_leaves_the_tower_alone(tmp_path):
    """With the VLM's Perceiver (config.model.resampler, as ``stage(connector=...)`` sets it) the read-out
    trains the resampler only, and a Perceiver VLM starts vision_resampler from the run too."""
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    from vlmjax import sharding as shd  # pylint: disable=g-import-not-at-top
    from vlmjax.train import Trainer  # pylint: disable=g-import-not-at-top
    from vlmjax.train import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
    import sys  # pylint: disable=g-import-not-at-top
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from configs import scene_parse as scene_parse_config  # pylint: disable=g-import-not-at-top
    vlm = load_config("trm_vlm_qa", "smoke", stages={}, **{"connector.type": "perceiver"})
    stage = scene_parse_config.stage(vlm.vision_encoder.tower, vlm.data.scenes, vlm.data.image_size, 4, smoke=True,
                                     connector=vlm.connector)
    stage.lock()
    assert stage.model.resampler.num_latents == vlm.connector.num_latents > 0
    task = tasks.build(stage, None)
    params = task.init_variables(jax.random.key(0))["params"]
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    batch = task.eval_batches(global_batch_size=4, process_index=0, process_count=1)[0]
    batch = {k: jnp.asarray(v) for k, v in batch.items()}

    def latent_loss(p):
        _, _, _, terms = task._terms(p, batch)  # pylint: disable=protected-access
        return sum(v.mean() for k, v in terms.items() if k.startswith("latent/"))

    grads = tree.flatten(jax.grad(latent_loss)(params))
    tower = [np.abs(np.asarray(g)).max() for k, g in grads.items() if k.startswith("vision_tower/")]
    resampler = [np.abs(np.asarray(g)).max() for k, g in grads.items() if k.startswith("vision_resampler/")]
    assert tower and max(tower) == 0.0  # stop_gradient: the tower learns from its own head only
    assert resampler and max(resampler) > 0.0

    vision_dir = str(tmp_path / "vision")
    s = runner.run(stage, vision_dir)
    assert 0.0 <= s["eval_end"]["latent/shape_acc"] <= 1.0 and "latent/colour_acc" in s["eval_end"]
    saved = tree.flatten(checkpoint_lib.load_params(vision_dir)[0])
    vtask = tasks.build(vlm, None, {"vision": vision_dir})
    tr = Trainer(vlm, vtask, shd.make_mesh(vlm.mesh))
    got = tree.flatten(vtask.pretrained_params(tr.abstract_state.params, tr.state_shardings.params))
    assert {k.split("/")[0] for k in got} == {"vision_tower", "vision_token_norm", "vision_resampler"}
    for k, v in got.items():
        np.testing.assert_array_equal(np.asarray(v), saved[k])
