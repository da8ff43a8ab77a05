"""One thin entry point per DVC stage: parse paths, load config, call the library, write outputs.

Each module ends with ``run(main)`` (:func:`pipeline.launch.run`).
"""
