// Validates KEDA objects against KEDA's published schema, as compiled by
// @kubernetes-models/keda. Reads a JSON list of objects on stdin; prints a JSON list with one
// entry per object: null when it is valid, else the validator's message.
import * as keda from "@kubernetes-models/keda/keda.sh/v1alpha1";

let input = "";
for await (const chunk of process.stdin) input += chunk;
const results = JSON.parse(input).map((object) => {
  const Model = keda[object.kind];
  if (object.apiVersion !== "keda.sh/v1alpha1" || Model === undefined) {
    return `not a keda.sh/v1alpha1 kind: ${object.apiVersion} ${object.kind}`;
  }
  try {
    new Model(object).validate();
    return null;
  } catch (error) {
    return String(error.message);
  }
});
process.stdout.write(JSON.stringify(results));
