"""`pmd demo` and the generated data it shares with the tests: not part of the library.

drawings   the one synthetic-image generator (coloured shapes their captions describe)
synthetic  a small PMD in the exact upstream formats, drawn with it
serve      a static file server on 127.0.0.1 for the URL sources' images
demo       generate, serve, build, verify, audit, train and evaluate, offline
"""
