import sys

from kubeproxy.cli import main

sys.exit(main())
