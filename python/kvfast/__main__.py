from kvfast.cli import main

raise SystemExit(main())
