"""benchmarks/correction_frontier.py: the Pareto front it plots, on points with a known answer."""

from benchmarks.correction_frontier import pareto


def test_pareto_front_keeps_exactly_the_undominated_points():
    points = [{"name": n, "test_utility_loss": u, "test_rate": r} for n, u, r in [
        ("a", 0.00, 1.00), ("b", 0.02, 0.50), ("c", 0.03, 0.60), ("d", 0.10, 0.10), ("e", 0.10, 0.20),
        ("f", 0.02, 0.50)]]
    front = pareto(points)
    # c is beaten by b on both axes, e by d; b and f tie exactly and are both kept; sorted by utility loss
    assert [p["name"] for p in front] == ["a", "b", "f", "d"]
