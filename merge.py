"""merge.py: merge a LoRA adapter into its base model and export a verified standalone model.

Not built yet: it arrives with the merge issue (`python merge.py adapter=RUN/final output=DIR`).
Running it today says so and exits with status 2 rather than pretending to merge.
"""

import sys

if __name__ == "__main__":
    print(__doc__.strip(), file=sys.stderr)
    sys.exit(2)
