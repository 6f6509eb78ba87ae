// ESLint (flat config) for the web pages' JavaScript: the operator page and the plain preview.
// scripts/install-test-tools.sh installs eslint, @eslint/js and globals (pinned) into
// .tools/node_modules, which is gitignored: they are required from there by path.
const js = require("./.tools/node_modules/@eslint/js");
const globals = require("./.tools/node_modules/globals");

module.exports = [
  js.configs.recommended,
  {
    files: ["engine/control/web/static/**/*.js", "bridges/static/**/*.js"],
    languageOptions: {
      ecmaVersion: 2022,
      sourceType: "module",
      globals: { ...globals.browser },
    },
  },
];
