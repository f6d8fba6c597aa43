/**
 * The appliance's control API: HTTP/JSON on a local address. The manager will
 * drive appliances through it; until then operators and tests use it with
 * curl. Errors become responses in one place (`handle`), as
 * `{ "error": { "code", "message" } }` with a fitting status.
 *
 *   GET    /v1/status                          appliance, volumes, every group
 *   GET    /v1/groups/:group                   one group (source or target role)
 *   POST   /v1/protect                         add protection (a ProtectConfig), also to volumes being served
 *   DELETE /v1/groups/:group                   {"drainMs": N} remove protection; the volumes stay served
 *   PUT    /v1/rate                            {"bytesPerSecond": N} the appliance's limit (0: none)
 *   PUT    /v1/groups/:group/rate              {"bytesPerSecond": N} a group's limit
 *   POST   /v1/groups/:group/quiesce           {"timeoutMs": N} hold write completions
 *   POST   /v1/groups/:group/release           end the hold
 *   POST   /v1/groups/:group/sync                {"mode": "delta"} compare every block with the target
 *   POST   /v1/groups/:group/checkpoint        {"kind": "tagged", "name": "..."} marker into the stream
 *   GET    /v1/groups/:group/checkpoints       checkpoints in the target's journal
 *   POST   /v1/groups/:group/views             {"volume", "checkpoint"|"timeMs"|"latest"} export a recovery view over NBD
 *   GET    /v1/groups/:group/views             open views
 *   DELETE /v1/groups/:group/views/:name       close a view (its scratch writes are thrown away)
 *
 * Protection added or removed and limits set here outlive a restart (`control-changes.ts`); a change
 * in force that could not be recorded answers 500 `not-recorded`.
 */
import * as http from 'node:http';
import type { Logger } from '../util/logger.js';
import { formatAddress } from '../util/address.js';
import { ControlChangeNotRecorded, ProtectionChangeRefused, stopDrainMsMax, type Appliance } from './appliance.js';
import { ConfigError, parseProtectConfig } from './config.js';
import type { ViewPoint } from '../journal/journal.js';

/** 'latest': the largest time a Date can hold, so every durable write is included. */
const latestTimeMs = 8_640_000_000_000_000;
/** Scratch space a view gets for test writes unless the request says otherwise. */
export const viewScratchBytesDefault = 1024 * 1024 * 1024;
/** Longest a removal of protection may wait for the target to acknowledge what is queued. */
export const removeDrainMsMax = 600_000;
/** Largest request body the API reads. */
export const requestBodyBytesMax = 64 * 1024;

class ApiError extends Error {
  constructor(readonly status: number, readonly code: string, message: string) {
    super(message);
  }
}

async function readBody(request: http.IncomingMessage): Promise<unknown> {
  const chunks: Buffer[] = [];
  let bytes = 0;
  for await (const chunk of request) {
    bytes += (chunk as Buffer).length;
    if (bytes > requestBodyBytesMax) throw new ApiError(413, 'too-large', `The request body is over ${requestBodyBytesMax} bytes`);
    chunks.push(chunk as Buffer);
  }
  if (bytes === 0) return {};
  try {
    return JSON.parse(Buffer.concat(chunks).toString('utf8'));
  } catch {
    throw new ApiError(400, 'bad-json', 'The request body is not valid JSON');
  }
}

function numberField(body: unknown, name: string, minimum: number, maximum = Number.MAX_SAFE_INTEGER): number {
  const value = (body as Record<string, unknown> | null)?.[name];
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < minimum || value > maximum) {
    throw new ApiError(400, 'bad-request', `'${name}' must be a whole number from ${minimum} to ${maximum}`);
  }
  return value;
}

export class ControlApi {
  private readonly server: http.Server;

  constructor(private readonly appliance: Appliance, private readonly logger: Logger) {
    this.server = http.createServer((request, response) => void this.handle(request, response));
  }

  listen(address: { host: string; port: number }): Promise<string> {
    return new Promise((resolve, reject) => {
      this.server.once('error', reject);
      this.server.listen(address.port, address.host, () => {
        this.server.off('error', reject);
        resolve(formatAddress(this.server.address()));
      });
    });
  }

  close(): Promise<void> {
    return new Promise((resolve) => {
      this.server.close(() => resolve());
      this.server.closeAllConnections();
    });
  }

  private async handle(request: http.IncomingMessage, response: http.ServerResponse): Promise<void> {
    let status = 200;
    let body: unknown;
    try {
      body = await this.route(request);
    } catch (error) {
      if (error instanceof ApiError) {
        status = error.status;
        body = { error: { code: error.code, message: error.message } };
      } else if (error instanceof ConfigError) {
        status = 400;
        body = { error: { code: 'bad-config', message: error.message } };
      } else if (error instanceof ControlChangeNotRecorded) {
        // The change is in force: the caller learns that a restart would undo it.
        status = 500;
        body = { error: { code: 'not-recorded', message: error.message } };
      } else {
        status = 500;
        body = { error: { code: 'internal', message: (error as Error).message } };
        this.logger.error('control API request failed', { method: request.method, url: request.url, error: (error as Error).message });
      }
    }
    const text = JSON.stringify(body, null, 2) + '\n';
    response.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
    response.end(text);
  }

  private async route(request: http.IncomingMessage): Promise<unknown> {
    const url = new URL(request.url ?? '/', 'http://appliance');
    const parts = url.pathname.split('/').filter(Boolean);
    const method = request.method ?? 'GET';
    const appliance = this.appliance;
    if (parts[0] !== 'v1') throw new ApiError(404, 'not-found', `No route ${method} ${url.pathname} (routes start with /v1/)`);
    const route = `${method} /${parts.slice(1, 2).join('/')}${parts.length > 2 ? '/:group' : ''}${parts.length > 3 ? `/${parts[3]}` : ''}${parts.length > 4 ? '/:name' : ''}`;
    const groupName = parts[2];
    const source = groupName === undefined ? undefined : appliance.sources.get(groupName);
    const target = groupName === undefined ? undefined : appliance.targets.get(groupName);
    const needSource = () => {
      if (!source) throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' protects no group '${groupName}' as a source`);
      return source;
    };
    switch (route) {
      case 'GET /status':
        return appliance.status();
      case 'GET /groups/:group':
        if (source) return source.status();
        if (target) return target.status();
        throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' has no group '${groupName}'`);
      case 'POST /protect': {
        const protect = parseProtectConfig(await readBody(request), 'protect', process.cwd());
        try {
          const group = await appliance.addSource(protect);
          return group.status();
        } catch (error) {
          if (error instanceof ControlChangeNotRecorded) throw error;
          throw new ApiError(409, 'cannot-protect', (error as Error).message);
        }
      }
      case 'DELETE /groups/:group': {
        if (!source && target) throw new ApiError(409, 'cannot-unprotect', `Appliance '${appliance.config.appliance.name}' receives group '${groupName}'; protection is removed at its source appliance`);
        needSource();
        const body = (await readBody(request)) as Record<string, unknown>;
        const drainMs = body['drainMs'] === undefined ? stopDrainMsMax : numberField(body, 'drainMs', 0, removeDrainMsMax);
        try {
          return await appliance.removeSource(groupName!, drainMs);
        } catch (error) {
          // Another removal of the group got there first, or the appliance is stopping.
          if (error instanceof ProtectionChangeRefused) throw new ApiError(error.code === 'unknown-group' ? 404 : 409, error.code === 'unknown-group' ? 'unknown-group' : 'cannot-unprotect', error.message);
          throw error;
        }
      }
      case 'PUT /rate': {
        const bytesPerSecond = numberField(await readBody(request), 'bytesPerSecond', 0);
        await appliance.setRateLimit(bytesPerSecond);
        return { rateLimitBytesPerSecond: bytesPerSecond };
      }
      case 'PUT /groups/:group/rate': {
        needSource();
        const bytesPerSecond = numberField(await readBody(request), 'bytesPerSecond', 0);
        try {
          await appliance.setGroupRateLimit(groupName!, bytesPerSecond);
        } catch (error) {
          // Its protection was removed while the request was read.
          if (error instanceof ProtectionChangeRefused) throw new ApiError(404, 'unknown-group', error.message);
          throw error;
        }
        return { group: groupName, rateLimitBytesPerSecond: bytesPerSecond };
      }
      case 'POST /groups/:group/quiesce': {
        const group = needSource();
        const timeoutMs = numberField(await readBody(request), 'timeoutMs', 1, 60_000);
        try {
          group.quiesce(timeoutMs);
        } catch (error) {
          throw new ApiError(409, 'cannot-quiesce', (error as Error).message);
        }
        return { group: group.name, quiesced: true, timeoutMs };
      }
      case 'POST /groups/:group/release':
        return { group: needSource().name, released: needSource().release() };
      case 'POST /groups/:group/sync': {
        const group = needSource();
        const body = (await readBody(request)) as Record<string, unknown>;
        if (body['mode'] !== 'delta') throw new ApiError(400, 'bad-request', `'mode' must be 'delta' (compare every block with the target by checksum and ship the ones that differ)`);
        try {
          return { group: group.name, sync: await group.requestDeltaSync('requested through the control API') };
        } catch (error) {
          throw new ApiError(409, 'cannot-sync', (error as Error).message);
        }
      }
      case 'POST /groups/:group/checkpoint': {
        const group = needSource();
        const body = (await readBody(request)) as Record<string, unknown>;
        const kind = body['kind'] ?? 'tagged';
        const name = body['name'];
        if (typeof kind !== 'string' || !/^[a-z][a-z0-9-]{0,31}$/.test(kind) || kind.startsWith('sync-')) throw new ApiError(400, 'bad-request', `'kind' must be a lower-case word (not sync-*)`);
        if (name !== undefined && (typeof name !== 'string' || name.length === 0 || name.length > 256)) throw new ApiError(400, 'bad-request', `'name' must be a string of 1 to 256 characters`);
        try {
          return { group: group.name, ...group.checkpoint(kind, name as string | undefined) };
        } catch (error) {
          // A sync runs or waits: the target is not consistent until it ends.
          throw new ApiError(409, 'cannot-checkpoint', (error as Error).message);
        }
      }
      case 'GET /groups/:group/checkpoints': {
        if (!target) throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' receives no group '${groupName}'`);
        return { group: target.name, checkpoints: target.checkpoints() };
      }
      case 'POST /groups/:group/views': {
        if (!target) throw new ApiError(404, 'unknown-group', `Appliance '${appliance.config.appliance.name}' receives no group '${groupName}'`);
        const body = (await readBody(request)) as Record<string, unknown>;
        const volume = body['volume'];
        if (typeof volume !== 'string') throw new ApiError(400, 'bad-request', `'volume' must name a volume of the group`);
        let at: ViewPoint;
        if (typeof body['checkpoint'] === 'string') at = { checkpoint: body['checkpoint'] };
        else if (body['timeMs'] !== undefined) at = { timeMs: numberField(body, 'timeMs', 0) };
        else if (body['latest'] === true) at = { timeMs: latestTimeMs };
        else throw new ApiError(400, 'bad-request', `give 'checkpoint' (an id), 'timeMs', or 'latest': true`);
        const scratchBytesMax = body['scratchBytesMax'] === undefined ? viewScratchBytesDefault : numberField(body, 'scratchBytesMax', 0);
        try {
          return await appliance.openView({ group: target.name, volume, at, scratchBytesMax });
        } catch (error) {
          throw new ApiError(409, 'cannot-open-view', (error as Error).message);
        }
      }
      case 'GET /groups/:group/views':
        return { group: groupName, views: appliance.listViews(groupName ?? '') };
      case 'DELETE /groups/:group/views/:name':
        if (!(await appliance.closeView(parts[4] ?? ''))) throw new ApiError(404, 'unknown-view', `No open view '${parts[4]}'`);
        return { closed: parts[4] };
      default:
        throw new ApiError(404, 'not-found', `No route ${method} ${url.pathname}`);
    }
  }
}
