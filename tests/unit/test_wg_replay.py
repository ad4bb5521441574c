from overlay.wireguard.constants import REJECT_AFTER_MESSAGES
from overlay.wireguard.replay import ReplayWindow


def test_window_is_at_least_2048_bits():
    assert ReplayWindow().size >= 2048


def test_in_order_and_duplicates():
    w = ReplayWindow()
    for i in range(100):
        assert w.accept(i)
    for i in range(100):
        assert not w.accept(i)


def test_out_of_order_inside_window():
    w = ReplayWindow(size=64)
    assert w.accept(10)
    assert w.accept(5)
    assert w.accept(7)
    assert not w.accept(5)
    assert w.accept(9)
    assert w.accept(0)
    assert not w.accept(10)


def test_too_old_rejected():
    w = ReplayWindow(size=64)
    assert w.accept(1000)
    assert not w.accept(1000 - 64)
    assert w.accept(1000 - 63)


def test_bitmap_moves_and_clears_on_big_jump():
    w = ReplayWindow(size=2048)
    for i in range(0, 3000, 3):
        assert w.accept(i)
    # a jump beyond the window forgets everything older, and nothing breaks
    assert w.accept(3000 + 5000)
    assert not w.accept(3000 + 5000)
    assert not w.accept(2997)  # now far outside
    assert w.accept(3000 + 5000 - 1)
    # shifting repeatedly across the window size keeps exact duplicate detection
    base = 20000
    for i in range(base, base + 5000):
        assert w.accept(i)
    assert not w.accept(base + 4999 - 2047)
    assert not w.accept(base + 4999 - 2048)


def test_check_does_not_record_and_limit():
    w = ReplayWindow()
    assert w.check(5)
    assert w.check(5)
    assert w.accept(5)
    assert not w.check(5)
    assert not w.accept(REJECT_AFTER_MESSAGES)


def test_matches_reference_model_on_random_sequences():
    import random
    rnd = random.Random(7)
    for size in (64, 2048, 8128):
        w = ReplayWindow(size=size)
        seen: set[int] = set()
        highest = -1
        counter = 0
        for _ in range(20000):
            step = rnd.choice([1, 1, 1, 2, 5, -3, -70, -size, -size + 1, 300, size + 5])
            counter = max(0, counter + step)
            expected = counter not in seen and not (highest - counter >= size)
            assert w.accept(counter) == expected, (size, counter, highest)
            if expected:
                seen.add(counter)
                highest = max(highest, counter)
