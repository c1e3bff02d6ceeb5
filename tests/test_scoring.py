import numpy as np

from maxent_jax.scoring import bucket, build_score_batch


def test_layout_positions_and_masks():
    b = build_score_batch([[5, 6, 7], [8]], [[1, 2], [3, 4, 9, 9, 9]], prompt_len=4, completion_len=3, pad_id=0,
                          behaviour_logps=[[-0.5, -0.25], [-1.0, -2.0, -3.0, -4.0, -5.0]])
    np.testing.assert_array_equal(b["input_ids"], [[0, 5, 6, 7, 1, 2, 0], [0, 0, 0, 8, 3, 4, 9]])
    np.testing.assert_array_equal(b["positions"], [[0, 0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 1, 2, 3]])
    np.testing.assert_array_equal(b["attention_mask"][0], [0, 1, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["completion_mask"], [[1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(b["completion_ids"], [[1, 2, 0], [3, 4, 9]])
    np.testing.assert_allclose(b["behaviour_logp"], [[-0.5, -0.25, 0], [-1, -2, -3]])


def test_long_prompt_keeps_its_tail_and_buckets():
    b = build_score_batch([[1, 2, 3, 4, 5]], [[7]], prompt_len=3, completion_len=2, pad_id=0)
    np.testing.assert_array_equal(b["input_ids"], [[3, 4, 5, 7, 0]])
    assert bucket(17, 16, 512) == 32 and bucket(600, 16, 512) == 512 and bucket(0, 8, 64) == 8
