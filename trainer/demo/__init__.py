"""The built-in demo world: a procedural world of coloured shapes in which a small CuMo is trained end to end."""
