from sbpatch.bench.cli import main

raise SystemExit(main())
