from sbpatch.cli import main

raise SystemExit(main())
