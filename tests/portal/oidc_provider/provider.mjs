// A real OpenID Connect provider (panva/oidc-provider) for the portal's
// upstream-login tests. Test use only: development interactions (any login
// with any password), keys made fresh at every start, everything in memory.
//
//   node provider.mjs '<JSON settings>'
//
// settings: {"clients": [oidc-provider client metadata, ...],
//            "accounts": {"<sub>": {claims...}, ...},
//            "idTokenAlgs": ["RS256", ...]}   (optional)
//
// It listens on 127.0.0.1 on a free port, prints one JSON line
// {"issuer": "http://127.0.0.1:PORT"} on stdout, and exits when its standard
// input closes (so it never outlives the test run that started it).

import { generateKeyPairSync, randomBytes } from 'node:crypto';
import { createServer } from 'node:http';

import Provider from 'oidc-provider';

const settings = JSON.parse(process.argv[2] || '{}');
const accounts = settings.accounts || {};

function privateJWK(type, options, extra) {
  const { privateKey } = generateKeyPairSync(type, options);
  return { ...privateKey.export({ format: 'jwk' }), ...extra };
}

// One key of each kind the portal accepts; no "alg" on the RSA key, so that
// it signs both RS256 and PS256 (and the portal must not guess from the key).
const keys = [
  privateJWK('rsa', { modulusLength: 2048 }, { kid: 'rsa-1', use: 'sig' }),
  privateJWK('ec', { namedCurve: 'P-256' }, { kid: 'ec-1', use: 'sig' }),
  privateJWK('ed25519', {}, { kid: 'ed-1', use: 'sig' }),
];

const server = createServer();
server.listen(0, '127.0.0.1', () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  const provider = new Provider(issuer, {
    clients: settings.clients || [],
    jwks: { keys },
    cookies: { keys: [randomBytes(32).toString('hex')] },
    pkce: { required: () => true },
    features: { devInteractions: { enabled: true } },
    claims: {
      openid: ['sub'],
      profile: ['name', 'preferred_username'],
      email: ['email', 'email_verified'],
    },
    enabledJWA: {
      idTokenSigningAlgValues: settings.idTokenAlgs || ['RS256', 'PS256', 'ES256', 'EdDSA'],
    },
    async findAccount(ctx, id) {
      return {
        accountId: id,
        async claims() {
          return { sub: id, ...(accounts[id] || {}) };
        },
      };
    },
  });
  // The tests talk plain HTTP on loopback.
  provider.proxy = false;
  server.on('request', provider.callback());
  process.stdout.write(`${JSON.stringify({ issuer })}\n`);
});

process.stdin.on('end', () => process.exit(0));
process.stdin.on('close', () => process.exit(0));
process.stdin.resume();
