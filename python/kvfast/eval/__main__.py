from kvfast.eval import main

raise SystemExit(main())
