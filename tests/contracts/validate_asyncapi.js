// Validates AsyncAPI documents with the AsyncAPI initiative's own parser (@asyncapi/parser).
// Usage: node validate_asyncapi.js FILE...   (NODE_PATH names the node_modules holding it)
// Prints one JSON line per file: {"file", "errors": [...], "warnings": [...]}; exits 1 on errors.
"use strict";
const fs = require("fs");
const { Parser, DiagnosticSeverity } = require("@asyncapi/parser");

async function main() {
  const parser = new Parser();
  let failed = false;
  for (const file of process.argv.slice(2)) {
    const { document, diagnostics } = await parser.parse(fs.readFileSync(file, "utf8"));
    const show = (d) => `${d.code}: ${d.message} at ${JSON.stringify(d.path)}`;
    const errors = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Error).map(show);
    const warnings = diagnostics.filter((d) => d.severity === DiagnosticSeverity.Warning).map(show);
    if (document === undefined && errors.length === 0) errors.push("the parser returned no document");
    failed = failed || errors.length > 0;
    console.log(JSON.stringify({ file, errors, warnings }));
  }
  process.exit(failed ? 1 : 0);
}

main().catch((err) => {
  console.error(err);
  process.exit(2);
});
