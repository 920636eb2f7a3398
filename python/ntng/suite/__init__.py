"""`ntng test PATH…`: run many test scripts, each in its own `ntng run` subprocess.

One concept a module: `discover` (which files are tests), `shard` (CI matrix split),
`budget` (cores and memory: which test may start now), `state` (the resume file),
`output` (the suite's JUnit XML and JSON log), `runner` (processes, streaming, signals).
"""
