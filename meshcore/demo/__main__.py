"""`python -m meshcore.demo --pod NAME:PORT:TEXT ...`: run demo pods (see meshcore.demo.pod)."""
import sys

from meshcore.demo.pod import main

sys.exit(main())
