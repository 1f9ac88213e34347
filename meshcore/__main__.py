from meshcore.cli import main

raise SystemExit(main())
