from tunproxy.cli import main

raise SystemExit(main())
