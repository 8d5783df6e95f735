"""Fill-in-the-blank Triton kernels, run in Triton's interpreter: see exercises/README.md.

Each exercises/<name>.py is a small copy of one of our kernels with a blank to fill; ``python -m exercises check``
(exercises/check.py) runs them against the tests their real kernels pass.
"""
