"""MemoryTracker on real tensors: what it counts (new storages, once, rounded, resized), when it stops
counting (the storage is freed), the category each storage gets (phase, override, ``assign``) and
what the peak records (bytes by category, phase, innermost module)."""
from __future__ import annotations

import torch
from torch import nn

from maskdit_fast.plan.tracker import CATEGORIES, MemoryTracker


def test_a_tensor_counts_while_it_lives_and_stays_in_the_peak():
    with MemoryTracker(rounding=1) as tracker:
        x = torch.empty(100)  # 400 bytes
        assert tracker.live == 400 and tracker.bytes_of("temporaries") == 400  # setup phase: not activations
        y = torch.empty(50, dtype=torch.float64)  # 400 more
        assert tracker.live == 800
        del x
        assert tracker.live == 400
        del y
    assert tracker.live == 0
    assert tracker.peak.bytes == 800


def test_views_and_in_place_ops_do_not_count_again():
    with MemoryTracker(rounding=1) as tracker:
        x = torch.zeros(10, 10)
        views = [x.view(100), x[:5], x.t(), x.unsqueeze(0)]
        x.add_(1)
        x.mul_(2)
        assert tracker.live == 400
        y = x + 1  # a new storage
        assert tracker.live == 800
        del views, y
    assert tracker.peak.bytes == 800


def test_bytes_are_rounded_per_storage_not_per_tensor():
    with MemoryTracker() as tracker:  # the CUDA caching allocator's 512 bytes
        a = torch.empty(1)  # 4 bytes -> 512
        b = torch.empty(129)  # 516 bytes -> 1024
        c = torch.empty(128)  # 512 bytes -> 512
        halves = c.split(64)  # views: nothing new
        assert tracker.live == 512 + 1024 + 512
        del a, b, c, halves


def test_assign_moves_a_storage_to_another_category_without_counting_it_twice():
    outside = torch.empty(64)  # made before the tracker: only counted once assigned
    with MemoryTracker(rounding=1) as tracker:
        assert tracker.live == 0
        tracker.assign([outside, outside.view(8, 8), None, 3], "parameters")  # non-tensors are skipped
        assert tracker.bytes_of("parameters") == 256 and tracker.live == 256
        with tracker.phase("forward"):
            act = torch.empty(32)
        assert tracker.bytes_of("activations") == 128
        tracker.assign([act], "gradients")
        assert tracker.bytes_of("activations") == 0 and tracker.bytes_of("gradients") == 128
        assert tracker.live == 384
        del act
        assert tracker.bytes_of("gradients") == 0 and tracker.live == 256


def test_resizing_a_storage_is_tracked_both_ways():
    with MemoryTracker(rounding=1) as tracker:
        x = torch.empty(10)  # 40 bytes
        storage = x.untyped_storage()
        storage.resize_(0)  # FSDP frees unsharded parameters so
        assert tracker.live == 0
        storage.resize_(400)  # ... and refills them so
        assert tracker.live == 400
        x.resize_(200)  # the tensor op: 800 bytes
        assert tracker.live == 800
        fresh = torch.empty(0)
        fresh.untyped_storage().resize_(1000)  # an empty storage the tracker saw grows
        assert tracker.live == 1800
        del x, storage, fresh
    assert tracker.live == 0 and tracker.peak.bytes == 1800


def test_the_phase_and_category_override_set_new_storages_categories():
    with MemoryTracker(rounding=1) as tracker:
        with tracker.phase("forward"):
            act = torch.empty(10)
            with tracker.category("fsdp_gathered"):
                gathered = torch.empty(20)
            with tracker.phase("backward"):
                grad_of_act = torch.empty(30)
            after = torch.empty(40)  # back in the forward phase
        with tracker.phase("optimizer"):
            work = torch.empty(50)
        assert tracker.current == {**dict.fromkeys(CATEGORIES, 0), "activations": 200, "fsdp_gathered": 80,
                                   "temporaries": 320}
        del act, gathered, grad_of_act, after, work
    assert set(tracker.phase_peaks) == {"forward", "backward", "optimizer"}
    assert tracker.phase_peaks["backward"].bytes == 40 + 80 + 120
    assert tracker.phase_peaks["optimizer"].bytes == 40 + 80 + 120 + 160 + 200


def test_the_peak_records_its_parts_phase_and_innermost_module():
    net = nn.Sequential(nn.Linear(8, 1000), nn.ReLU(), nn.Linear(1000, 2))
    x = torch.randn(4, 8)
    with torch.no_grad(), MemoryTracker(rounding=1) as tracker:
        tracker.assign([*net.parameters()], "parameters")
        with tracker.phase("forward"):
            out = net(x)
    # Linear 0 makes 4 x 1000 floats; ReLU makes 4 x 1000 more while the first still lives: the peak.
    weights = sum(p.numel() * 4 for p in net.parameters())
    assert tracker.peak.bytes == weights + 2 * 16000
    assert tracker.peak.by_category["parameters"] == weights
    assert tracker.peak.by_category["activations"] == 32000
    assert sum(tracker.peak.by_category.values()) == tracker.peak.bytes
    assert (tracker.peak.phase, tracker.peak.module) == ("forward", "Sequential.1")
    assert out.shape == (4, 2)


def test_a_peak_outside_every_module_names_no_module():
    with MemoryTracker(rounding=1) as tracker, tracker.phase("forward"):
        x = torch.empty(1000)
    assert tracker.peak.module == "" and tracker.peak.phase == "forward"
    del x
