import gc
import sys

from trainer.cli import main

code = main()
# Everything is written and closed. Freezing the heap spares the interpreter's last
# collection a walk over every TensorFlow object (≈0.7 s) on the way out.
gc.freeze()
sys.exit(code)
