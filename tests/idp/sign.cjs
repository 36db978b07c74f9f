// Signs a JWT the way an attacker (or a misconfigured client) would, for the refusal tests:
//   node sign.cjs <private-jwks.json | new> '<claims as JSON>'
// With a keys file, the token is signed by its first key (the provider's own): a token pgiam
// must still refuse for its claims (issuer, audience, expiry). With `new`, by a fresh key the
// provider never published, under a kid of its own. Prints the compact JWT.
'use strict';
const jose = require('jose');
const fs = require('fs');

async function main() {
  const [source, claimsJson] = process.argv.slice(2);
  if (!source || !claimsJson) {
    console.error('usage: sign.cjs <private-jwks.json|new> <claims-json>');
    process.exit(2);
  }
  const claims = JSON.parse(claimsJson);
  let key;
  let kid;
  if (source === 'new') {
    ({ privateKey: key } = await jose.generateKeyPair('RS256'));
    kid = 'not-published-by-the-provider';
  } else {
    const jwk = JSON.parse(fs.readFileSync(source, 'utf8')).keys[0];
    key = await jose.importJWK(jwk, 'RS256');
    kid = jwk.kid;
  }
  const jwt = await new jose.SignJWT(claims)
    .setProtectedHeader({ alg: 'RS256', kid, typ: 'JWT' })
    .sign(key);
  process.stdout.write(`${jwt}\n`);
}

main().catch((e) => {
  console.error(`sign: ${e.message}`);
  process.exit(1);
});
