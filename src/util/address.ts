import type * as net from 'node:net';

/** HOST:PORT of a listening server (IPv6 hosts in brackets), or the socket path. */
export function formatAddress(address: net.AddressInfo | string | null): string {
  if (!address || typeof address === 'string') return String(address);
  return address.family === 'IPv6' ? `[${address.address}]:${address.port}` : `${address.address}:${address.port}`;
}
