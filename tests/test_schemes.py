"""scheme.star: exact round trip, RELION's writing order, traversal (last edge, forks), reset."""

from __future__ import annotations

from tamis.schemes import Edge, Operator, Scheme, SchemeJob


def _scheme() -> Scheme:
    s = Scheme("Schemes/proc/", "WAIT")
    s.floats = {
        "wait_sec": (180.0, 180.0),
        "current_nr_parts": (0.0, 0.0),
        "batch_size": (1e4, 1e4),
    }
    s.bools = {"has_larger_nr_parts": (False, False), "do_2d": (True, True)}
    s.strings = {
        "myref": ("undefined", "undefined"),
        "path": ("Schemes/proc/extract/particles.star", "x y"),
    }
    s.operators = {
        "WAIT": Operator("wait", "undefined", "wait_sec"),
        "COUNT_PARTS": Operator("float=count_images", "current_nr_parts", "path", "particles"),
        "CHECK": Operator("bool=gt", "has_larger_nr_parts", "current_nr_parts", "batch_size"),
    }
    s.jobs = {"extract": SchemeJob("extract"), "class2d": SchemeJob("Class2D/job012/", "new", True)}
    s.edges = [
        Edge("WAIT", "extract"),
        Edge("extract", "COUNT_PARTS"),
        Edge("COUNT_PARTS", "CHECK"),
        Edge("CHECK", "WAIT", True, "class2d", "has_larger_nr_parts"),
        Edge("class2d", "WAIT"),
    ]
    return s


def test_round_trip_is_exact(tmp_path):
    s = _scheme()
    a = tmp_path / "a.star"
    s.write(a)
    back = Scheme.read(a)
    assert back == s
    b = tmp_path / "b.star"
    back.write(b)
    assert a.read_text() == b.read_text()
    text = a.read_text()
    order = [
        text.index(f"data_scheme_{k}")
        for k in ("general", "floats", "bools", "strings", "operators", "jobs", "edges")
    ]
    assert order == sorted(order) and text.count("# version 50001") == 7
    # variables sorted by name, edges in their own order
    assert text.index("batch_size") < text.index("current_nr_parts") < text.index("wait_sec")
    assert '"x y"' in text


def test_traversal_forks_reset_and_set_var():
    s = _scheme()
    assert s.next_node("CHECK") == "WAIT"
    s.set_variable("has_larger_nr_parts", "True")
    assert s.next_node("CHECK") == "class2d"
    assert s.next_node("nowhere") == "undefined"
    s.edges.append(Edge("class2d", "COUNT_PARTS"))  # a later duplicate edge wins, as in RELION
    assert s.next_node("class2d") == "COUNT_PARTS"
    s.set_variable("wait_sec", "60", "90")
    s.reset()
    assert s.floats["wait_sec"] == (90.0, 90.0) and s.bools["has_larger_nr_parts"] == (False, False)
    assert s.jobs["class2d"].current_name == "class2d" and not s.jobs["class2d"].has_started
    assert s.current_node == "WAIT"
